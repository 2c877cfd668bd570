"""DVC versioning: reading a past data version by git revision, and an S3 remote (moto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steps.data.ingest import IngestConfig, ingest
from steps.data.validate import ValidateConfig, raise_on_failure, validate
from steps.data.version import DataRevisionError, VersionConfig, data_at_rev, version_data
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
