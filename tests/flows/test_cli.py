"""The `sift` command line: argument errors name the setting; `sift select` runs alone."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import MODEL_DIR

runner = CliRunner()


def test_run_rejects_an_unknown_key_before_doing_anything(tmp_path: Path):
    result = runner.invoke(app, ["run", "--project-dir", str(tmp_path), "--set", "select.budgt=3"])
    assert result.exit_code == 2
    assert "select.budgt" in result.output
    assert not (tmp_path / ".sift").exists()


def test_show_config_prints_the_resolved_value():
    result = runner.invoke(app, ["show-config", "--set", "select.selector=uniform"])
    assert result.exit_code == 0 and "selector: uniform" in result.output


@pytest.mark.slow
def test_select_alone_writes_ordered_ids_gains_and_objective(project: Path, tmp_path: Path):
    out = tmp_path / "picked.json"
    args = [
        "select",
        "--data",
        str(project / "raw" / "train.jsonl"),
        "--out",
        str(out),
        "--model",
        str(MODEL_DIR),
        "--budget",
        "8",
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    picked = json.loads(out.read_text())
    assert len(picked["ids"]) == len(set(picked["rows"])) == 8
    assert picked["final_objective"] == pytest.approx(picked["objective"][-1])
    assert all(a >= b - 1e-9 for a, b in zip(picked["gains"], picked["gains"][1:], strict=False))

    too_many = runner.invoke(app, [*args[:7], "--budget", "500", *args[9:]])
    assert too_many.exit_code == 2 and "need 1..80" in too_many.output
