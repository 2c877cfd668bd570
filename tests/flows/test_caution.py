"""`sift select` prints the caution line once, on stderr, when the chosen selector has no
measured edge over uniform for its budget kind (steps/selection/evidence.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from steps.selection.evidence import caution
from tests.conftest import MODEL_DIR


def _select(project: Path, out: Path, *overrides: str):
    args = ["select", "--data", str(project / "raw" / "train.jsonl"), "--out", str(out)]
    for item in (f"model.name={MODEL_DIR}", "model.device=cpu", *overrides):
        args += ["--set", item]
    return CliRunner().invoke(app, args)


@pytest.mark.slow
def test_select_prints_the_caution_once_on_stderr(project: Path, tmp_path: Path):
    cautioned = _select(project, tmp_path / "a.json", "select.budget_tokens=2000")
    assert cautioned.exit_code == 0, cautioned.output
    line = caution("fisher-label", "tokens")  # the default selector
    assert line is not None and cautioned.stderr.count(line) == 1
    assert "caution:" not in cautioned.stdout and "selected by fisher-label" in cautioned.stdout

    plain = _select(project, tmp_path / "b.json", "select.selector=uniform", "select.budget=8")
    assert plain.exit_code == 0, plain.output
    assert "caution:" not in plain.output
