"""`sift run --data-rev`: a past run's data, read through dvc.api, reproduces its selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config, resolve_paths
from steps.data.version import data_at_rev
from steps.selection.embedding.embed import embed_pool
from steps.selection.select import select_subset, selected_ids
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, write_jsonl

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).parent / "dvc")  # the venv's, activated or not
GIT = ["git", "-c", "user.name=sift-test", "-c", "user.email=sift@example.invalid"]


def _config(project: Path):
    return resolve_paths(
        load_config(
            None,
            [
                "data.source=raw/train.jsonl",
                "data.eval_source=raw/test.jsonl",
                f"model.name={MODEL_DIR}",
                ALLOW_REPO_ASSETS,
                "select.budget=0.25",
                "finetune.epochs=1",  # the last step's loss is logged however few steps
                "finetune.batch_size=8",
                f"version.remote_url={project.parent / 'remote'}",
                "registry.model_name=sift-reproduce",
                "registry.promote=false",
                "eval.suite=none",  # the held-out loss only: this test is about the data
                f"tracking.tracking_uri=sqlite:///{project.parent / 'mlflow.db'}",
            ],
        ),
        project,
    )


def _selected(client: MlflowClient, run_id: str, tmp_path: Path) -> list[str]:
    path = client.download_artifacts(run_id, "selection/selection.json", str(tmp_path))
    return list(json.loads(Path(path).read_text())["ids"])


def test_data_rev_reproduces_a_past_selection(
    prefect_harness, project: Path, tmp_path: Path, gsm8k_train
):
    from prefect.artifacts import Artifact

    from flows.pipeline import pipeline

    config = _config(project)
    state = pipeline(config, project, return_state=True)
    first = state.result()
    docs = Artifact.get("data-docs")
    assert docs is not None and docs.flow_run_id == state.state_details.flow_run_id
    assert "index.html" in str(docs.data) and "passed" in str(docs.description)
    for args, expected in ((["status"], "up to date"), (["status", "-c"], "in sync")):
        status = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True)
        assert expected in status.stdout, status.stdout + status.stderr  # clean after a run
    paths = ["data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore"]
    subprocess.run([*GIT, "add", *paths], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "data for run 1"], cwd=project, check=True)
    subprocess.run([*GIT, "tag", "run-1"], cwd=project, check=True)

    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[::-1])  # new data since then
    pointer = (project / "data.dvc").read_bytes()
    again = pipeline(config, project, data_rev="run-1")
    assert again.data_md5 == first.data_md5 and again.pool_examples == first.pool_examples
    assert (project / "data.dvc").read_bytes() == pointer  # the working tree is left alone

    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient()
    run = client.get_run(again.run_id)
    assert run.data.tags["dvc.data_rev"] == "run-1"
    assert run.data.tags["dvc.md5"] == first.data_md5
    docs_logged = {a.path for a in client.list_artifacts(first.run_id, "data_docs/local_site")}
    assert "data_docs/local_site/index.html" in docs_logged  # Data Docs attached to the run
    picked = _selected(client, first.run_id, tmp_path / "first")
    assert _selected(client, again.run_id, tmp_path / "again") == picked

    # And without any cache: the tables read back by revision give the same picks.
    tables, _ = data_at_rev(project, "run-1", tmp_path / "fresh")
    features = embed_pool(
        tables.train.path, config.model, config.embed, tmp_path / "f", "cpu", "fp32"
    )
    fresh = select_subset(features, tables.train.path, config.select, tmp_path / "selection")
    assert selected_ids(fresh) == picked
