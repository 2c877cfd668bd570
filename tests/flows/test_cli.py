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


@pytest.mark.slow
def test_run_with_an_unknown_prior_stops_with_one_line_naming_it(prefect_harness, project: Path):
    store = f"sqlite:///{project / 'mlflow.db'}"
    args = ["run", "--project-dir", str(project), "--set", f"tracking.tracking_uri={store}"]
    sources = [f"data.source={project / 'raw' / 'train.jsonl'}", f"model.name={MODEL_DIR}"]
    for override in [*sources, "select.prior=0123abcd"]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "sift run stopped: select.prior='0123abcd': no such MLflow run" in result.output
    assert not (project / "data").exists() and not (project / "data.dvc").exists()


def test_show_config_prints_the_resolved_value():
    result = runner.invoke(app, ["show-config", "--set", "select.selector=uniform"])
    assert result.exit_code == 0 and "selector: uniform" in result.output


def _select_args(project: Path, out: Path, budget: int, *extra: str) -> list[str]:
    return [
        "select",
        "--data",
        str(project / "raw" / "train.jsonl"),
        "--out",
        str(out),
        "--model",
        str(MODEL_DIR),
        "--budget",
        str(budget),
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_select_alone_writes_ordered_ids_gains_and_objective(project: Path, tmp_path: Path):
    out = tmp_path / "picked.json"
    args = _select_args(project, out, 8)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    picked = json.loads(out.read_text())
    assert len(picked["ids"]) == len(set(picked["rows"])) == 8
    assert picked["final_objective"] == pytest.approx(picked["objective"][-1])
    assert all(a >= b - 1e-9 for a, b in zip(picked["gains"], picked["gains"][1:], strict=False))

    too_many = runner.invoke(app, _select_args(project, out, 500))
    assert too_many.exit_code == 2 and "need 1..80" in too_many.output


@pytest.mark.slow
def test_select_with_prior_excludes_and_keeps_the_earlier_picks(project: Path, tmp_path: Path):
    first_out, warm_out = tmp_path / "first" / "picked.json", tmp_path / "warm" / "picked.json"
    first = runner.invoke(app, _select_args(project, first_out, 8))
    assert first.exit_code == 0, first.output
    assert (first_out.parent / "design.npy").exists()
    warm = runner.invoke(app, _select_args(project, warm_out, 5, "--prior", str(first_out)))
    assert warm.exit_code == 0, warm.output
    before, after = json.loads(first_out.read_text()), json.loads(warm_out.read_text())
    assert len(after["ids"]) == 5 and not set(after["ids"]) & set(before["ids"])
    assert after["train_ids"] == before["ids"] + after["ids"]
    assert after["feature_space"] == before["feature_space"]
    assert after["prior"]["source"] == str(first_out) and after["prior"]["in_pool"] == 8
    assert after["objective"][0] - after["gains"][0] == pytest.approx(after["prior"]["objective"])


def test_select_with_a_missing_prior_exits_2_naming_it(project: Path, tmp_path: Path):
    missing = tmp_path / "nowhere" / "selection.json"
    result = runner.invoke(
        app, _select_args(project, tmp_path / "o.json", 8, "--prior", str(missing))
    )
    assert result.exit_code == 2 and "--prior" in result.output
    assert not (tmp_path / "o.json").exists()
