"""What `sift` prints where: rows that never wrap when stdout is a pipe or a log, --json as
one JSON document alone on stdout, library logs only with --verbose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, REPO
from tests.flows.test_evaluate_cli import CUSTOM_TASK

runner = CliRunner()
# Longer than any column an 80-column table leaves it: it wrapped over two rows before.
LONG_TASK = "hellaswag_localized_cloze_with_a_long_name"


def _custom_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    rows = [{"ctx": "The cat sat on the", "endings": [" mat.", " sky."], "label": 0}] * 4
    (tasks / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CUSTOM_TASK.format(data=tasks / "cloze.jsonl").replace("tiny_cloze", LONG_TASK)
    (tasks / "cloze.yaml").write_text(task)
    return tasks


def _evaluate(tmp_path: Path, *extra: str):
    args = ["evaluate", "--project-dir", str(tmp_path), "--model", str(MODEL_DIR)]
    args += ["--suite", "none", "--set", f"eval.include_path={_custom_task(tmp_path)}"]
    args += ["--set", f"eval.tasks=[{LONG_TASK}]", "--out", str(tmp_path / "out"), *extra]
    return runner.invoke(app, args, env={"COLUMNS": "80"})


@pytest.mark.slow
def test_piped_evaluate_keeps_a_long_task_name_and_its_score_on_one_line(tmp_path: Path):
    result = _evaluate(tmp_path)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if LONG_TASK in line]
    assert len(rows) == 1, result.stdout  # grep finds the task's row, whole
    assert "acc" in rows[0] and "challenger" not in rows[0]
    assert not any(line.strip("│ ") == "al" for line in result.stdout.splitlines())


@pytest.mark.slow
def test_evaluate_json_is_one_document_on_stdout(tmp_path: Path):
    result = _evaluate(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # nothing else on stdout: the report line is stderr
    assert set(document) >= {"model", "scores", "rows", "notes", "report"}
    (score,) = [s for s in document["scores"] if s["metric"] == "acc"]
    assert score["task"] == LONG_TASK and 0.0 <= score["value"] <= 1.0
    assert document["rows"][0]["task"] == LONG_TASK
    assert Path(document["report"]).is_file()


def _validate(project: Path, *extra: str) -> list[str]:
    return ["validate", "--data", "raw/train.jsonl", "--eval-data", "raw/test.jsonl",
            "--project-dir", str(project), "--set", f"model.name={MODEL_DIR}",
            "--set", ALLOW_REPO_ASSETS, *extra]  # fmt: skip


def test_validate_json_holds_the_counts_and_nothing_else(project: Path):
    result = runner.invoke(app, _validate(project, "--json"))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["valid"] is True
    assert (document["pool_rows"], document["eval_rows"], document["quarantined"]) == (80, 16, 0)
    assert Path(document["data_docs"]).is_file() and document["quarantine"] == []


def test_library_logs_show_with_verbose_only(project: Path):
    """A real process with stdout a pipe: transformers' INFO ("loading configuration file",
    reads the model folder) reaches stderr with --verbose and not by default."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    command = [sys.executable, "-m", "flows.cli", *_validate(project)]
    runs = {
        verbose: subprocess.run(
            command + (["--verbose"] if verbose else []),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for verbose in (False, True)
    }
    for done in runs.values():
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("valid: 80 pool and 16 eval rows")
    assert "loading configuration file" not in runs[False].stderr, runs[False].stderr
    assert "loading configuration file" in runs[True].stderr


def test_loading_weights_bars_show_with_verbose_only(capsys):
    """transformers draws a "Loading weights" bar on every model load: by default a run's
    console has none of them, with --verbose they are back; its other bars are untouched.
    (configure_logging(verbose=True) itself would leave INFO settings in this worker.)"""
    from transformers.utils.logging import set_tqdm_hook, tqdm

    from flows.runtime import _loading_bars, configure_logging
    from steps.modeling import ModelConfig, load_model

    try:
        for verbose in (False, True):
            configure_logging(False)
            _loading_bars(verbose)  # what configure_logging(verbose) does to the bars
            load_model(ModelConfig(name=str(MODEL_DIR)), "cpu")
            list(tqdm(range(3), desc="Another bar"))
            err = capsys.readouterr().err
            assert ("Loading weights" in err) is verbose, err
            assert "Another bar" in err
    finally:
        set_tqdm_hook(None)
