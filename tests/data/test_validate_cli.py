"""`sift validate`: ingest + the suite alone; non-zero exit naming what failed; data/ untouched."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flows.cli.main import app
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, write_jsonl

runner = CliRunner()


def _validate(project: Path, data: str, *extra: str):
    args = ["validate", "--data", data, "--eval-data", "raw/test.jsonl"]
    args += ["--project-dir", str(project), "--set", f"model.name={MODEL_DIR}"]
    args += ["--set", ALLOW_REPO_ASSETS, *extra]
    return runner.invoke(app, args)


def test_valid_data_passes_without_touching_the_versioned_data(project: Path):
    result = _validate(project, "raw/train.jsonl")
    assert result.exit_code == 0, result.output
    assert "valid: 80 pool and 16 eval rows (0 quarantined)" in result.output
    assert "Data Docs: " in result.output
    assert (project / ".sift" / "validate" / "data" / "train.parquet").is_file()
    assert not (project / "data").exists() and not (project / "data.dvc").exists()


def test_failed_expectations_exit_non_zero_and_are_named(project: Path, gsm8k_train):
    rows = [dict(r) for r in gsm8k_train]
    rows[5]["answer"] = ""
    rows[9] = dict(rows[8])  # an exact duplicate
    write_jsonl(project / "raw" / "train.jsonl", rows)
    result = _validate(project, "raw/train.jsonl", "--set", "validation.on_invalid=fail")
    assert result.exit_code == 1
    out = " ".join(result.output.split())  # undo the console's line wrapping
    assert "data validation failed (2 problem(s)); data/ left unchanged" in out
    assert (
        "[train] expect_column_value_lengths_to_be_between on column 'response' (1 rows); " in out
    )
    unique = "[train] expect_column_values_to_be_unique on column 'content_id' (2 rows) - exact "
    assert unique + "duplicates: the same prompt and response; raw/train.jsonl line 9 (" in out
    assert not (project / "data").exists()


def test_ingest_errors_exit_non_zero_with_the_line(project: Path):
    (project / "raw" / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    result = _validate(project, "raw/broken.jsonl")
    assert result.exit_code == 1
    assert "line 2 is not valid JSON" in " ".join(result.output.split())


def test_a_bad_setting_is_a_usage_error(project: Path):
    result = _validate(project, "raw/train.jsonl", "--set", "validation.on_invalid=maybe")
    assert result.exit_code == 2 and "validation.on_invalid" in result.output


def test_quarantined_rows_are_printed_with_their_file_line(project: Path, gsm8k_train):
    rows = [dict(r) for r in gsm8k_train]
    rows[6]["answer"] = "   \n\t"  # whitespace only: as empty as ""
    write_jsonl(project / "raw" / "train.jsonl", rows)
    result = _validate(
        project, "raw/train.jsonl", "--set", "validation.max_quarantine_fraction=0.05"
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "valid: 79 pool and 16 eval rows (1 quarantined)" in out
    assert "quarantined [train] raw/train.jsonl line 7" in out, out
