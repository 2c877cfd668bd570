"""`sift evaluate`: any model on the benchmark suites, a user's own task without code, and
bad input stopped before any model is loaded."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from steps.evaluation.suites import REPO_ROOT
from tests.conftest import MODEL_DIR

runner = CliRunner()
CUSTOM_TASK = """task: tiny_cloze
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _evaluate(tmp_path: Path, *args: str):
    return runner.invoke(app, ["evaluate", "--project-dir", str(tmp_path), *args])


@pytest.mark.slow
def test_a_model_folder_on_the_quick_suite_prints_a_table_and_writes_a_report(tmp_path: Path):
    out = tmp_path / "report"
    result = _evaluate(tmp_path, "--model", str(MODEL_DIR), "--limit", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    for task in ("arc_easy", "piqa", "winogrande", "lambada"):  # names may fold in the table
        assert task in result.output
    assert (out / "report.html").is_file() and (out / "benchmarks.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["arc_easy"]["effective"] == 3


@pytest.mark.slow
def test_a_users_own_task_yaml_runs_without_code(tmp_path: Path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    rows = [{"ctx": "The cat sat on the", "endings": [" mat.", " sky."], "label": 0}] * 4
    (tasks / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "cloze.yaml").write_text(CUSTOM_TASK.format(data=tasks / "cloze.jsonl"))
    result = _evaluate(
        tmp_path, "--model", str(MODEL_DIR), "--suite", "none",
        "--set", f"eval.include_path={tasks}", "--set", "eval.tasks=[tiny_cloze]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tiny_cloze" in result.output and "arc_easy" not in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--tasks", "no_such_task"], "'no_such_task'"),
        (["--suite", "nosuite"], "eval.suite='nosuite'"),
        (["--set", "eval.data_dir=empty"], "arc_easy"),
        (["--set", "eval.include_path=broken"], "bad.yaml"),
        (["--set", "eval.num_fewshot=2"], "eval.num_fewshot=2"),
    ],
)
def test_bad_input_exits_naming_the_task_or_file_before_loading_the_model(
    tmp_path: Path, args: list[str], named: str
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.yaml").write_text("task: x\n  dataset_path: [unclosed\n")
    # A model path that does not exist: reaching the model load would fail differently.
    result = _evaluate(tmp_path, "--model", str(tmp_path / "no-model"), *args)
    assert result.exit_code == 2, result.output
    assert named in result.output and "sift evaluate:" in result.output


def test_a_missing_data_file_names_the_file(tmp_path: Path):
    data = tmp_path / "eval-data"
    shutil.copytree(REPO_ROOT / "assets" / "eval", data)
    (data / "piqa" / "validation.jsonl").unlink()
    result = _evaluate(tmp_path, "--model", "x", "--set", f"eval.data_dir={data}")
    assert result.exit_code == 2
    assert str(data / "piqa" / "validation.jsonl") in result.output
