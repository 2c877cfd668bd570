import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from steps.data.ingest import IngestConfig, ingest
from steps.data.validate import DataValidationError, ValidateConfig, raise_on_failure, validate
from steps.data.version import VersionConfig, version_data
from steps.modeling import ModelConfig
from tests.conftest import MODEL_DIR, write_jsonl

MODEL = ModelConfig(name=str(MODEL_DIR))


def _staged(project: Path, tmp_path: Path):
    config = IngestConfig(
        source=str(project / "raw" / "train.jsonl"), eval_source=str(project / "raw" / "test.jsonl")
    )
    return ingest(config, project, tmp_path / "staging")


def test_clean_data_passes_and_is_published(project: Path, tmp_path: Path):
    report = validate(
        _staged(project, tmp_path),
        ValidateConfig(on_invalid="fail"),
        MODEL,
        tmp_path / "gx",
        project / "data",
    )
    assert report.success and report.failures == ()
    assert raise_on_failure(report).train.rows == 80
    assert Path(report.data_docs_path).is_file()  # Data Docs HTML built
    assert (project / "data" / "train.parquet").is_file()


def test_failed_suite_names_expectations_and_leaves_data_untouched(
    project: Path, tmp_path: Path, gsm8k_train, gsm8k_test
):
    bad = [dict(r) for r in gsm8k_train]
    for row in bad[:10]:
        row["answer"] = ""  # 10 of 80 empty responses: far above the quarantine limit
    write_jsonl(project / "raw" / "train.jsonl", bad)
    write_jsonl(project / "raw" / "test.jsonl", gsm8k_test + gsm8k_train[20:22])  # leakage
    report = validate(
        _staged(project, tmp_path), ValidateConfig(), MODEL, tmp_path / "gx", project / "data"
    )
    assert not report.success and report.accepted is None
    text = "\n".join(report.failures)
    assert "expect_column_value_lengths_to_be_between on column 'response'" in text
    assert "[eval] expect_column_values_to_not_be_in_set on column 'content_id'" in text
    assert "max_quarantine_fraction" in text
    with pytest.raises(DataValidationError, match="data/ left unchanged"):
        raise_on_failure(report)
    assert not (project / "data").exists()


def test_quarantine_drops_few_bad_rows_with_reasons(project: Path, tmp_path: Path, gsm8k_train):
    bad = [dict(r) for r in gsm8k_train]
    bad[3]["answer"] = ""
    write_jsonl(project / "raw" / "train.jsonl", bad)
    config = ValidateConfig(on_invalid="quarantine", max_quarantine_fraction=0.05)
    report = validate(_staged(project, tmp_path), config, MODEL, tmp_path / "gx", project / "data")
    assert report.success and report.quarantined == 1
    quarantined = pd.read_parquet(project / "data" / "quarantine.parquet")
    assert "expect_column_value_lengths_to_be_between" in quarantined.reason[0]
    assert report.accepted is not None and report.accepted.train.rows == 79


def test_dvc_tracks_data_and_pushes_to_a_local_remote(project: Path, tmp_path: Path):
    report = validate(
        _staged(project, tmp_path), ValidateConfig(), MODEL, tmp_path / "gx", project / "data"
    )
    assert report.accepted is not None
    config = VersionConfig(remote_url=str(tmp_path / "remote"))
    first = version_data(project / "data", project, config)
    again = version_data(project / "data", project, config)
    assert first == again  # unchanged data: same md5, nothing new
    assert first.train_md5 == report.accepted.train.md5  # DVC's md5 is the file's md5
    dvc_file = yaml.safe_load((project / "data.dvc").read_text())
    assert dvc_file["outs"][0]["md5"] == first.dir_md5
    assert any((tmp_path / "remote").rglob("*.dir"))
    dvc = str(Path(sys.executable).parent / "dvc")  # the venv's, activated or not
    status = subprocess.run([dvc, "status", "-c"], cwd=project, capture_output=True, text=True)
    assert "in sync" in status.stdout, status.stdout + status.stderr
    assert "/data" in (project / ".gitignore").read_text()  # the data itself stays out of git


@pytest.mark.slow
def test_chunked_validation_sums_failures_and_quarantines_across_chunks(
    project: Path, tmp_path: Path, gsm8k_train, monkeypatch
):
    import steps.data.validate

    bad = [dict(r) for r in gsm8k_train]
    bad[3]["answer"] = bad[50]["answer"] = ""
    bad[70] = dict(bad[2])  # a duplicate in another chunk
    write_jsonl(project / "raw" / "train.jsonl", bad)
    whole = validate(
        _staged(project, tmp_path / "a"),
        ValidateConfig(on_invalid="quarantine", max_quarantine_fraction=0.1),
        MODEL,
        tmp_path / "gx",
        tmp_path / "whole",
    )
    # 80 rows: 4 chunks. Rows 2 and 3 in the first, the second clean, 50 in the third and 70
    # (a copy of row 2) in the last: failures summed over chunks apart, lines offset by chunk.
    monkeypatch.setattr(steps.data.validate, "CHUNK_ROWS", 20)
    failed = validate(
        _staged(project, tmp_path / "b"),
        ValidateConfig(on_invalid="fail"),
        MODEL,
        tmp_path / "gx",
        tmp_path / "unused",
    )
    text = "\n".join(failed.failures)
    assert "'response' (2 rows); raw/train.jsonl line 4 (''), raw/train.jsonl line 51 ('')" in text
    assert "[train] expect_column_values_to_be_unique on column 'content_id' (2 rows)" in text
    chunked = validate(
        _staged(project, tmp_path / "c"),
        ValidateConfig(on_invalid="quarantine", max_quarantine_fraction=0.1),
        MODEL,
        tmp_path / "gx",
        tmp_path / "chunked",
    )
    assert whole.quarantined == chunked.quarantined == 4  # both copies of the duplicate go
    for name in ("train.parquet", "quarantine.parquet"):
        left = pd.read_parquet(tmp_path / "whole" / name)
        pd.testing.assert_frame_equal(left, pd.read_parquet(tmp_path / "chunked" / name))
    assert whole.accepted is not None and whole.accepted.train.rows == 76
