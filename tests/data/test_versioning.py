"""DVC versioning: reading a past data version by git revision, and an S3 remote (moto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from steps.data.ingest import IngestConfig, ingest, write_table
from steps.data.validate import ValidateConfig, raise_on_failure, validate
from steps.data.version import DataRevisionError, VersionConfig, data_at_rev, version_data
from steps.hashing import file_md5
from steps.modeling import ModelConfig
from tests.conftest import MODEL_DIR, write_jsonl
from tests.s3 import moto_s3, object_keys

DVC = str(Path(sys.executable).parent / "dvc")  # the venv's, activated or not
GIT = ["git", "-c", "user.name=sift-test", "-c", "user.email=sift@example.invalid"]


def _validated(project: Path, tmp_path: Path, name: str) -> None:
    """Ingest + validate raw/ into data/ (what the flow does before versioning)."""
    staged = ingest(
        IngestConfig(source="raw/train.jsonl", eval_source="raw/test.jsonl"),
        project,
        tmp_path / name / "staging",
    )
    config = ValidateConfig(on_invalid="fail")
    model = ModelConfig(name=str(MODEL_DIR))
    raise_on_failure(validate(staged, config, model, tmp_path / name / "gx", project / "data"))


def _commit(project: Path, message: str) -> str:
    paths = ["data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore"]
    subprocess.run([*GIT, "add", *paths], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", message], cwd=project, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.slow
def test_a_past_version_is_read_back_by_git_revision(project: Path, tmp_path: Path, gsm8k_train):
    (project / "README.md").write_text("a project before it had data\n")
    subprocess.run([*GIT, "add", "README.md"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "start"], cwd=project, check=True)
    config = VersionConfig(remote_url=str(tmp_path / "remote"))
    _validated(project, tmp_path, "first")
    first = version_data(project / "data", project, config)
    first_rev = _commit(project, "data v1")
    status = subprocess.run([DVC, "status"], cwd=project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr
    ignored = subprocess.run(["git", "check-ignore", ".dvc/cache", "data"], cwd=project)
    assert ignored.returncode == 0  # neither the cache nor the data itself goes into git

    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[:60])
    _validated(project, tmp_path, "second")
    second = version_data(project / "data", project, config)
    _commit(project, "data v2")
    assert second.dir_md5 != first.dir_md5

    tables, version = data_at_rev(project, first_rev, tmp_path / "v1")
    assert (version.dir_md5, version.train_md5, version.eval_md5) == (
        first.dir_md5,
        first.train_md5,
        first.eval_md5,
    )
    assert tables.train.rows == 80 and tables.train.md5 == first.train_md5
    assert (project / "data.dvc").read_text().count(second.dir_md5) == 1  # working tree as is

    shutil.rmtree(project / ".dvc" / "cache")  # a fresh clone: only the remote has the data
    tables, version = data_at_rev(project, first_rev, tmp_path / "v1-from-remote")
    assert version.train_md5 == first.train_md5 == tables.train.md5

    with pytest.raises(DataRevisionError, match="revision 'HEAD~2' of .* has no data.dvc"):
        data_at_rev(project, "HEAD~2", tmp_path / "none")
    with pytest.raises(DataRevisionError, match="--data-rev 'no-such-tag': unknown Git revision"):
        data_at_rev(project, "no-such-tag", tmp_path / "none")


def _tables(folder: Path, answer: str) -> dict[str, str]:
    """train/eval tables as validation publishes them; returns their md5s."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        rows = {"id": ["a", "b"], "prompt": ["1+1?", "2+2?"], "response": [answer, answer]}
        write_table(pd.DataFrame(rows), folder / f"{split}.parquet")
    return {p.name: file_md5(p) for p in sorted(folder.iterdir())}


def test_a_failed_push_leaves_data_dvc_and_data_as_they_were(project: Path, tmp_path: Path):
    """data.dvc never names data the remote lacks: a push that fails (or a SIGTERM before it
    completes) puts data.dvc, and data/ when the tables were swapped in, back as they were."""
    data = project / "data"
    before = _tables(data, "2")
    version_data(data, project, VersionConfig(remote_url=str(tmp_path / "remote")))
    pointer = (project / "data.dvc").read_bytes()
    (tmp_path / "a-file").write_text("not a folder\n")
    broken = VersionConfig(remote_url=str(tmp_path / "a-file" / "remote"))

    _tables(data, "4")  # new tables in data/, their push fails
    with pytest.raises(Exception, match="a-file"):
        version_data(data, project, broken)
    assert (project / "data.dvc").read_bytes() == pointer

    assert _tables(data, "2") == before
    _tables(tmp_path / "accepted", "4")
    with pytest.raises(Exception, match="a-file"):  # the flow's way: swapped in from a folder
        version_data(data, project, broken, source_dir=tmp_path / "accepted")
    assert (project / "data.dvc").read_bytes() == pointer
    assert {p.name: file_md5(p) for p in sorted(data.iterdir())} == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".data")) == []


@pytest.fixture
def s3_endpoint(monkeypatch):
    """An in-process S3-compatible server (moto) on 127.0.0.1, with one empty bucket."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "sift-test",
        "AWS_SECRET_ACCESS_KEY": "sift-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with moto_s3("sift-data") as endpoint:
        yield endpoint


@pytest.mark.slow
def test_push_to_an_s3_remote(project: Path, tmp_path: Path, s3_endpoint: str):
    _validated(project, tmp_path, "s3")
    config = VersionConfig(remote_url="s3://sift-data/datasets", endpoint_url=s3_endpoint)
    version = version_data(project / "data", project, config)
    assert version.remote_url == "s3://sift-data/datasets"
    keys = set(object_keys(s3_endpoint, "sift-data"))
    digest = version.train_md5
    assert f"datasets/files/md5/{digest[:2]}/{digest[2:]}" in keys
    assert any(key.endswith(".dir") for key in keys)
    status = subprocess.run([DVC, "status", "-c"], cwd=project, capture_output=True, text=True)
    assert "in sync" in status.stdout, status.stdout + status.stderr

    rev = _commit(project, "data on s3")
    shutil.rmtree(project / ".dvc" / "cache")
    tables, read_back = data_at_rev(project, rev, tmp_path / "from-s3")
    assert read_back.dir_md5 == version.dir_md5 and tables.eval.md5 == version.eval_md5
