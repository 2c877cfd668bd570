"""Versioning: DVC tracks the validated data/ folder (data.dvc) and pushes it to a remote."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.repo import Repo
from pydantic import BaseModel, ConfigDict


class VersionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A folder (relative to the project) or any DVC remote URL (s3://bucket/prefix, ...).
    # Written to .dvc/config.local, so a user's remote never lands in git.
    remote_url: str = ".sift/dvc-remote"
    remote_name: str = "sift"
    push: bool = True


@dataclass(frozen=True)
class DataVersion:
    """The DVC identity of the data a run used: data.dvc's directory md5 and per-file md5s."""

    dir_md5: str
    train_md5: str
    eval_md5: str
    dvc_file: str
    remote_url: str | None


def _open_repo(repo_dir: Path) -> Repo:
    if not (repo_dir / ".dvc").is_dir():
        Repo.init(str(repo_dir), no_scm=not (repo_dir / ".git").exists())
    return Repo(str(repo_dir))


def _remote_url(url: str, project_dir: Path) -> str:
    if "://" in url:
        return url
    path = Path(url)
    return str(path if path.is_absolute() else (project_dir / path).resolve())


def _file_md5s(repo: Repo, dir_md5: str) -> dict[str, str]:
    """Reads DVC's .dir manifest (a JSON list of {md5, relpath}) from the local cache."""
    hexdigest = dir_md5.removesuffix(".dir")
    manifest = Path(repo.cache.local.path) / hexdigest[:2] / f"{hexdigest[2:]}.dir"
    return {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}


def version_data(data_dir: Path, repo_dir: Path, config: VersionConfig) -> DataVersion:
    """`dvc add` data_dir (writing <data_dir>.dvc beside it) and push it to the remote."""
    logging.getLogger("dvc").setLevel(logging.WARNING)  # no "git add" hints on every run
    repo = _open_repo(repo_dir)
    try:
        url = _remote_url(config.remote_url, repo_dir) if config.push else None
        if url is not None:
            with repo.config.edit("local") as local:
                local["remote"][config.remote_name] = {"url": url}
                local["core"]["remote"] = config.remote_name
        repo.add(str(data_dir))
        dvc_file = data_dir.parent / f"{data_dir.name}.dvc"
        dir_md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
        files = _file_md5s(repo, dir_md5)
        if url is not None:
            repo.push(remote=config.remote_name)
    finally:
        repo.close()
    return DataVersion(
        dir_md5=dir_md5,
        train_md5=files["train.parquet"],
        eval_md5=files["eval.parquet"],
        dvc_file=str(dvc_file),
        remote_url=url,
    )
