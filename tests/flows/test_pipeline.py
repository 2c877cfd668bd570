"""The whole flow on a small real slice, with the real Prefect API, MLflow, DVC and GX."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config, resolve_paths
from tests.conftest import small_run_overrides
from tests.flows.pipeline_driver import task_states

pytestmark = pytest.mark.slow
EXPENSIVE = {"ingest", "embed", "select", "finetune", "evaluate"}


def _config(project: Path, *extra: str):
    return resolve_paths(
        load_config(
            None,
            [
                *small_run_overrides(
                    project,
                    remote=project.parent / "remote",
                    model_name="sift-test",
                    tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}",
                ),
                *extra,
            ],
        ),
        project,
    )


def _run(config, project: Path):
    from flows.pipeline import pipeline

    state = pipeline(config, project, return_state=True)
    return state.result(), task_states(state.state_details.flow_run_id)


def _selection(client: MlflowClient, run_id: str, out_dir: Path) -> dict:
    path = client.download_artifacts(run_id, "selection/selection.json", str(out_dir))
    return json.loads(Path(path).read_text())


def test_pipeline_end_to_end_then_cached_then_new_budget_then_warm_start(
    prefect_harness, project: Path, tmp_path_factory
):
    config = _config(project)
    first, states = _run(config, project)
    assert all(states[name] == {"Completed"} for name in EXPENSIVE), states
    assert first.selected_examples == 20 and first.pool_examples == 80
    assert first.eval_loss_finetuned < first.eval_loss_base
    assert first.promoted and first.champion_version == first.model_version == "1"

    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient()
    run = client.get_run(first.run_id)
    assert run.data.tags["dvc.md5"] == first.data_md5
    assert run.data.tags["prefect.flow_run_id"]
    assert "git.sha" in run.data.tags and run.data.params["select.selector"] == "fisher-label"
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {
        run.data.tags["dvc.train_md5"][:36],
        run.data.tags["dvc.eval_md5"][:36],
    }
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "selection")}
    assert {"selection/selection.json", "selection/design.npy"} <= artifacts
    assert run.data.tags["select.prior_run"] == "none"
    generator = mlflow.transformers.load_model("models:/sift-test@champion")
    assert generator.model.config.hidden_size == 64
    assert str(client.get_model_version_by_alias("sift-test", "challenger").version) == "1"

    again, states = _run(config, project)  # unchanged data and config: all from cache
    assert all(states[name] == {"Cached"} for name in EXPENSIVE), states
    assert again.model_version == "1" and not again.promoted
    assert len(client.search_model_versions("name='sift-test'")) == 1

    cheaper, states = _run(_config(project, "select.budget=0.5"), project)
    assert states["ingest"] == {"Cached"} and states["embed"] == {"Cached"}
    assert states["select"] == {"Completed"} and states["finetune"] == {"Completed"}
    assert cheaper.model_version == "2" and cheaper.selected_examples == 40

    # Warm start from whichever version is champion now: its examples are not picked again,
    # and lead what the new model trains on (fine-tuning starts from the base model).
    downloads = tmp_path_factory.mktemp("selections")
    champion = client.get_model_version_by_alias("sift-test", "champion")
    champion_run = champion.tags["mlflow.source_run"]
    before = _selection(client, champion_run, downloads / "champion")
    warm, states = _run(_config(project, "select.prior=champion", "select.budget=10"), project)
    assert states["embed"] == {"Cached"} and states["select"] == {"Completed"}
    after = _selection(client, warm.run_id, downloads / "warm")
    assert not set(after["ids"]) & set(before["train_ids"])
    assert after["train_ids"] == before["train_ids"] + after["ids"]
    assert after["prior"]["source"] == champion_run == warm.prior_run
    assert warm.selected_examples == 10
    assert warm.train_examples == len(before["train_ids"]) + 10
    run = client.get_run(warm.run_id)
    assert run.data.tags["select.prior_run"] == champion_run
    assert run.data.metrics["select.train_examples"] == warm.train_examples
    assert "selection/design.npy" in {
        a.path for a in client.list_artifacts(warm.run_id, "selection")
    }
    version = client.get_model_version("sift-test", warm.model_version)
    assert version.tags["select.prior_run"] == champion_run


def test_invalid_data_stops_before_anything_downstream(prefect_harness, project: Path):
    (project / "raw" / "train.jsonl").write_text('{"question": "q", "answer": ""}\n' * 30)
    from flows.pipeline import pipeline
    from steps.data.validate import DataValidationError

    with pytest.raises(DataValidationError, match="expect_column_value_lengths_to_be_between"):
        pipeline(_config(project, "registry.model_name=sift-invalid"), project)
    assert not (project / "data").exists() and not (project / "data.dvc").exists()
    mlflow.set_tracking_uri(f"sqlite:///{project.parent / 'mlflow.db'}")
    assert MlflowClient().search_registered_models("name='sift-invalid'") == []
