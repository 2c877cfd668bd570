"""`sift study` for real: the quick config on a tiny GSM8K slice with stories260K, the real
Prefect API and MLflow on temporary SQLite; child runs, table, plots and artifacts."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from steps.study.study import load_study_config
from tests.conftest import MODEL_DIR, REPO, REPO_ASSETS_ROOTS

PNG = b"\x89PNG\r\n\x1a\n"


def _quick(project: Path, tracking_uri: str, *overrides: tuple[str, object]):
    """configs/study-quick.yaml on the `project` fixture's 80 GSM8K rows and the bundled model."""
    return load_study_config(
        REPO / "configs" / "study-quick.yaml",
        [
            ("data.source", str(project / "raw" / "train.jsonl")),
            ("data.eval_source", str(project / "raw" / "test.jsonl")),
            ("data.limit", None),
            ("model.name", str(MODEL_DIR)),
            ("data.allowed_roots", REPO_ASSETS_ROOTS),
            ("tracking.tracking_uri", tracking_uri),
            *overrides,
        ],
    )


def test_study_rejects_an_unknown_key_before_doing_anything(tmp_path: Path):
    args = ["study", "--project-dir", str(tmp_path), "--set", "study.budgts=[0.1]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "study.budgts" in result.output
    assert not (tmp_path / ".sift").exists()


@pytest.mark.slow
def test_quick_study_runs_child_trials_and_writes_table_and_plots(prefect_harness, project: Path):
    from flows.study import study

    tracking_uri = f"sqlite:///{project.parent / 'study-mlflow.db'}"
    config = _quick(
        project,
        tracking_uri,
        ("study.results_dir", "results"),
        ("synthetic.pool_sentences", 30),
        ("synthetic.test_tokens", 200),
    )
    result = study(config, project)

    assert result.trials == 4 and result.base_eval_loss > 5  # 2 arms × 2 budgets × 1 seed
    results = project / "results"
    trials = pd.read_csv(results / "trials.csv")
    assert sorted(zip(trials.arm, trials.examples, strict=True)) == [
        ("fisher", 8, ), ("fisher", 20), ("uniform", 8), ("uniform", 20)
    ]  # fmt: skip
    assert (trials.eval_loss < result.base_eval_loss).all()
    table = (results / "table.md").read_text()
    assert "| fisher | 0.25 | 1 | 20 |" in table and "Δ vs uniform" in table
    for plot in ("eval_loss.png", "synthetic.png"):
        assert (results / plot).read_bytes()[:8] == PNG
    synthetic = pd.read_csv(results / "synthetic_runs.csv")
    assert len(synthetic) == 2 * 2 * 2 and synthetic.max_error.between(0, 1).all()

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.data.params["study.arms"] == "['fisher', 'uniform']"
    assert parent.data.metrics["eval.loss_base"] == pytest.approx(result.base_eval_loss)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.params["arm"] for c in children} == {"fisher", "uniform"}
    assert all("eval_loss" in c.data.metrics for c in children)
    logged = {a.path for a in client.list_artifacts(result.run_id, "study")}
    assert {"study/table.md", "study/eval_loss.png", "study/trials.csv"} <= logged

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        artifact = prefect.read_latest_artifacts()
    assert any(a.key == "study-quick" and "eval loss" in str(a.data) for a in artifact)


@pytest.mark.slow
def test_at_a_token_budget_every_arm_trains_the_same_steps_on_the_same_tokens(
    prefect_harness, project: Path
):
    from flows.study import study

    tracking_uri = f"sqlite:///{project.parent / 'study-mlflow.db'}"
    kinds = ("study.budget_kinds", ["examples", "tokens"])
    config = _quick(project, tracking_uri, kinds, ("study.budgets", [0.25]), ("synthetic.runs", 0))
    result = study(config, project)

    assert result.trials == 4  # 2 arms × 2 budget kinds × 1 budget × 1 seed
    trials = pd.read_csv(Path(str(result.table_path)).parent / "trials.csv")
    examples = trials[trials.budget_kind == "examples"].set_index("arm")
    tokens = trials[trials.budget_kind == "tokens"].set_index("arm")
    # uniform's 20 examples (0.25 of 80) take ceil(20 / 8) = 3 steps: every token arm takes 3
    assert examples.steps["uniform"] == 3 and list(tokens.steps) == [3, 3]
    pool_dir = MlflowClient(tracking_uri).get_run(result.run_id).data.tags["features.pool_dir"]
    lengths = np.load(Path(pool_dir) / "n_tokens.npy")
    budget = round(0.25 * int(lengths.sum()))
    # each arm fills the same token budget, short of it by less than one example
    assert ((budget - lengths.max() < tokens.loss_tokens) & (tokens.loss_tokens <= budget)).all()
    assert tokens.examples["fisher"] < tokens.examples["uniform"]  # fewer, longer examples
    table = (Path(str(result.table_path))).read_text()
    assert "Equal examples" in table and "Equal tokens" in table


def test_two_runs_validate_apart_and_share_one_accepted_table(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Two studies over the same data at once each validate in a folder of their own (one
    Great Expectations project each: a shared one broke under two runs at once) and end on
    the same accepted table, at the path later runs' cached trials were keyed on; a later
    run reuses it without running the suite again and prints the same quarantine lines."""
    import flows.study
    from flows.study import _validated
    from flows.tasks import RunContext
    from steps.data.ingest import ingest
    from steps.data.validate import validate_into

    config = _quick(project, f"sqlite:///{tmp_path / 'unused.db'}")
    staged = ingest(config.data, project, tmp_path / "staging")
    place = tmp_path / "state" / "studies" / "validated"
    final = place / "accepted"
    for run in ("run-a", "run-b"):  # as two runs that both found the place empty
        validate_into(staged, config.validation, config.model, final, run)
    assert [p.name for p in place.iterdir()] == ["accepted"]  # no run's scratch folder is left
    shutil.rmtree(final)

    context = RunContext(project, tmp_path / "state", "cpu", "fp32", "run-a")
    first = _validated(config, config.model, staged, context)
    printed = capsys.readouterr().out
    monkeypatch.setattr(flows.study, "validate_into", None)  # a second suite run fails here
    second = _validated(config, config.model, staged, replace(context, run_id="run-b"))
    assert first == second and first.train.rows == staged.train.rows
    assert capsys.readouterr().out == printed
    folders = list(place.iterdir())
    assert len(folders) == 1 and "." not in folders[0].name
    assert Path(first.train.path).is_relative_to(folders[0])
