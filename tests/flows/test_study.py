"""`sift study` for real: the quick config on a tiny GSM8K slice with stories260K, the real
Prefect API and MLflow on temporary SQLite; child runs, table, plots and artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from steps.study.study import load_study_config
from tests.conftest import MODEL_DIR, REPO

PNG = b"\x89PNG\r\n\x1a\n"


def test_study_rejects_an_unknown_key_before_doing_anything(tmp_path: Path):
    args = ["study", "--project-dir", str(tmp_path), "--set", "study.budgts=[0.1]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "study.budgts" in result.output
    assert not (tmp_path / ".sift").exists()


@pytest.mark.slow
def test_quick_study_runs_child_trials_and_writes_table_and_plots(prefect_harness, project: Path):
    from flows.study import study

    tracking_uri = f"sqlite:///{project.parent / 'study-mlflow.db'}"
    config = load_study_config(
        REPO / "configs" / "study-quick.yaml",
        [
            ("data.source", str(project / "raw" / "train.jsonl")),
            ("data.eval_source", str(project / "raw" / "test.jsonl")),
            ("data.limit", None),
            ("model.name", str(MODEL_DIR)),
            ("tracking.tracking_uri", tracking_uri),
            ("study.results_dir", "results"),
            ("synthetic.pool_sentences", 30),
            ("synthetic.test_tokens", 200),
        ],
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
