"""A setting that leads outside data.allowed_roots stops a command or flow before anything
is read or tracked: no MLflow store or run, no data/ or data.dvc, no .sift/ state.

The refusal itself, setting by setting, is tests/unit/test_config_paths.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from flows.config import load_config, resolve_paths
from steps.paths import PathOutsideRoots
from tests.flows.test_evaluate_cli import CUSTOM_TASK  # a task reading one data file


def test_evaluate_refuses_a_task_whose_data_lies_outside_before_building_it(tmp_path: Path):
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "tasks").mkdir(parents=True)
    outside.mkdir()
    row = {"ctx": "The cat sat on the", "endings": [" mat.", " sky."], "label": 0}
    (outside / "private.jsonl").write_text(json.dumps(row) + "\n")
    task = CUSTOM_TASK.format(data=outside / "private.jsonl")
    (project / "tasks" / "escape.yaml").write_text(task)
    args = ["evaluate", "--project-dir", str(project), "--model", str(project / "no-model"),
            "--suite", "none", "--tasks", "tiny_cloze",
            "--set", "eval.include_path=tasks"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "eval.include_path" in result.output and "dataset_kwargs.data_files" in result.output
    assert str(outside / "private.jsonl") in result.output
    assert not (project / ".sift").exists()  # refused before the environment was set up


@pytest.mark.slow
def test_a_model_linked_out_of_the_project_stops_the_flow_before_a_run_is_tracked(
    prefect_harness, project: Path, tmp_path_factory
):
    """What a deployment runs (the flow itself, no CLI in front): the flow checks again."""
    from flows.pipeline import pipeline

    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.json").write_text("{}")
    (project / "models").mkdir()
    (project / "models" / "base").symlink_to(outside)
    store = project.parent / f"{project.name}-mlflow.db"
    overrides = ["data.source=raw/train.jsonl", "data.eval_source=raw/test.jsonl",
                 "model.name=models/base", f"tracking.tracking_uri=sqlite:///{store}",
                 f"version.remote_url={project.parent / 'remote'}", "eval.suite=none"]  # fmt: skip
    config = resolve_paths(load_config(None, overrides), project)
    with pytest.raises(PathOutsideRoots) as refused:
        pipeline(config, project)
    message = str(refused.value)
    assert "model.name" in message and str(project / "models" / "base") in message
    assert str(outside.resolve()) in message
    assert not store.exists()  # no MLflow run: the store was never even opened
    assert not (project / "data").exists() and not (project / "data.dvc").exists()
