"""The pipeline's evaluation on real lm-eval: benchmarks of base, challenger and champion in
MLflow and Prefect, the gate on a benchmark metric with stderr, and a scheduled run that
stops on data the champion was trained on."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config, resolve_paths
from tests.conftest import small_run_overrides
from tests.flows.pipeline_driver import task_states

pytestmark = pytest.mark.slow
NAME = "sift-bench"


def _config(project: Path, *extra: str):
    overrides = small_run_overrides(
        project,
        remote=project.parent / "remote",
        model_name=NAME,
        tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}",
        benchmarks=True,
    )
    return resolve_paths(load_config(None, [*overrides, *extra]), project)


def _run(config, project: Path):
    from flows.pipeline import pipeline

    state = pipeline(config, project, return_state=True)
    return state.result(), task_states(state.state_details.flow_run_id)


def _markdown_artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: str(a.data) for a in artifacts if a.type == "markdown"}


def test_benchmarks_gate_and_no_new_data(prefect_harness, project: Path):
    from flows.pipeline import pipeline

    first, _ = _run(_config(project), project)
    assert first.promoted and first.champion_version == "1"

    # A new challenger gated on a benchmark score: on 5 documents no difference the tiny
    # model makes exceeds the combined stderr (or it ties), and champion must stay.
    gated = _config(project, "select.budget=0.5", "registry.gate.metric=arc_easy/acc")
    state = pipeline(gated, project, return_state=True)
    second = state.result()
    assert second.model_version == "2" and not second.promoted, second.promotion_reason
    assert "does not exceed" in second.promotion_reason
    assert Path(second.report).is_file()

    mlflow.set_tracking_uri(gated.tracking.tracking_uri)
    client = MlflowClient()
    metrics = client.get_run(second.run_id).data.metrics
    for prefix in ("bench", "bench_base", "bench_champion"):
        assert 0.0 <= metrics[f"{prefix}/arc_easy/acc"] <= 1.0
        assert metrics[f"{prefix}/arc_easy/acc_stderr"] >= 0
        assert f"{prefix}/lambada_openai/perplexity" in metrics
    artifacts = {a.path for a in client.list_artifacts(second.run_id, "report")}
    assert {"report/report.html", "report/benchmarks.png"} <= artifacts
    logged = {a.path for a in client.list_artifacts(second.run_id, "benchmarks/challenger")}
    assert {"benchmarks/challenger/results.json", "benchmarks/challenger/samples.jsonl"} <= logged
    results = json.loads(
        Path(
            client.download_artifacts(second.run_id, "benchmarks/challenger/results.json")
        ).read_text()
    )
    assert results["versions"]["arc_easy"] == 1.0 and results["n-samples"]["arc_easy"]
    generations = {a.path for a in client.list_artifacts(second.run_id, "generations")}
    assert "generations/champion.json" in generations

    # The decision and its numbers on both versions; scores recorded on the challenger.
    challenger = client.get_model_version(NAME, "2")
    decision = json.loads(challenger.tags["sift.gate"])
    assert decision["promoted"] is False and decision["against"] == "1"
    assert decision["improvement"] <= max(decision["combined_stderr"], decision["min_margin"])
    champion = client.get_model_version(NAME, "1")
    assert json.loads(champion.tags["sift.gate.challenged_by.v2"])["promoted"] is False
    assert "arc_easy/acc" in json.loads(challenger.tags["sift.bench_scores"])

    # The logged model lists its benchmark metrics (MLflow 3 linked metrics).
    model_id = client.get_run(second.run_id).outputs.model_outputs[0].model_id
    linked = {m.key for m in client.get_logged_model(model_id).metrics or []}
    assert "bench/arc_easy/acc" in linked

    markdown = _markdown_artifacts(state.state_details.flow_run_id)
    assert "arc_easy" in markdown["sift-evaluation"]
    assert "promotion_reason" in markdown["sift-run-summary"]

    # Same data as champion v1 (budget 0.5 trained v2, which is not champion): a scheduled
    # run with the first config's data stops after validation.
    skipped, states = _run(_config(project, "schedule.skip_unchanged=true"), project)
    assert "no new data" in skipped.stopped and skipped.champion_version == "1"
    assert "embed" not in states and "finetune" not in states, states
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2

    # A failed run says why in an artifact beside its Failed state (what a notification or a
    # person in the UI reads); a gate metric the run cannot score stops it before any work.
    bad = pipeline(_config(project, "registry.gate.metric=arc_easy/f1"), project,
                   return_state=True)  # fmt: skip
    assert bad.is_failed()
    failed = _markdown_artifacts(bad.state_details.flow_run_id)["sift-run-failed"]
    assert "registry.gate.metric='arc_easy/f1'" in failed
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
