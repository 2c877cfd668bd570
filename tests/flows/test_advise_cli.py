"""`sift advise` on the bundled model and a GSM8K slice: a budget, its reason and the curves."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from tests.conftest import MODEL_DIR

runner = CliRunner()


def _advise_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`sift advise` on the tiny model, CPU; gsm8k's question/answer are the config defaults."""
    return ["advise", "--data", str(data), "--out", str(out), "--set", f"model.name={MODEL_DIR}",
            "--set", "model.device=cpu", *extra]  # fmt: skip


@pytest.mark.slow
def test_advise_prints_a_budget_and_writes_the_curves(project: Path, tmp_path: Path):
    out = tmp_path / "advice"
    result = runner.invoke(app, _advise_args(project / "raw" / "train.jsonl", out))
    assert result.exit_code == 0, result.output
    advice = json.loads((out / "advice.json").read_text())
    assert advice["candidates"] == 72 and advice["held_out"] == 8  # 10% of the 80-row slice
    assert 1 <= advice["examples"] <= advice["candidates"]
    assert f"{advice['examples']} examples ({advice['loss_tokens']} loss tokens)" in result.output
    assert advice["reason"] in result.output
    assert len(advice["gains"]) == 72 and advice["leverage_k"][-1] == 72
    assert (out / "advice.png").stat().st_size > 0

    too_many = runner.invoke(app, _advise_args(project / "raw" / "train.jsonl", out,
                                               "--max-budget", "500"))  # fmt: skip
    assert too_many.exit_code == 2 and "--max-budget=500: need 1..72" in too_many.output


def test_advise_refuses_a_max_budget_below_one_naming_it(project: Path, tmp_path: Path):
    args = _advise_args(project / "raw" / "train.jsonl", tmp_path / "o", "--max-budget", "0")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--max-budget" in result.output
    assert not (tmp_path / "o").exists()


def test_advise_refuses_a_missing_file_naming_data(tmp_path: Path):
    result = runner.invoke(app, _advise_args(tmp_path / "nowhere.jsonl", tmp_path / "o"))
    assert result.exit_code == 2 and "--data" in result.output and "nowhere.jsonl" in result.output
    assert not (tmp_path / "o").exists()
