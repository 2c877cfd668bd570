"""Versioning: DVC tracks the validated data/ folder (data.dvc) and pushes it to a remote."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import dvc.api
import pyarrow.parquet as pq
import yaml
from dvc.repo import Repo
from dvc.scm import RevError
from pydantic import BaseModel, ConfigDict

from steps.data.ingest import IngestResult, TableRef
from steps.hashing import file_md5


class VersionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A folder (relative to the project) or any DVC remote URL (s3://bucket/prefix, ...).
    # Written to .dvc/config.local, so a user's remote never lands in git.
    remote_url: str = ".sift/dvc-remote"
    remote_name: str = "sift"
    # S3-compatible stores other than AWS (MinIO, Ceph, moto): their endpoint URL.
    # Credentials come from the usual AWS variables, never from this file.
    endpoint_url: str | None = None
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
                remote = {"url": url}
                if config.endpoint_url:
                    remote["endpointurl"] = config.endpoint_url
                local["remote"][config.remote_name] = remote
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


class DataRevisionError(ValueError):
    """The requested git revision has no usable data.dvc, or its data cannot be fetched."""


def data_at_rev(
    repo_dir: Path, rev: str, out_dir: Path, data_path: str = "data"
) -> tuple[IngestResult, DataVersion]:
    """The validated data as versioned at git revision `rev`, read through `dvc.api`.

    Files come from the local DVC cache or, failing that, the default remote; each is
    checked against the md5 that the revision's manifest records. The working tree's data/
    and data.dvc are not touched.
    """
    logging.getLogger("dvc").setLevel(logging.WARNING)
    try:
        fs = dvc.api.DVCFileSystem(str(repo_dir), rev=rev)
        pointer = yaml.safe_load(fs.read_text(f"{data_path}.dvc"))
        entries = fs.ls(data_path, detail=True)
    except RevError as error:
        raise DataRevisionError(f"--data-rev {rev!r}: {error} in {repo_dir}") from None
    except FileNotFoundError as error:
        raise DataRevisionError(
            f"git revision {rev!r} of {repo_dir} has no {data_path}.dvc / {data_path}/ ({error})"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    md5s = {}
    for entry in entries:
        name = Path(entry["name"]).name
        target = out_dir / name
        with dvc.api.open(f"{data_path}/{name}", repo=str(repo_dir), rev=rev, mode="rb") as src:
            target.write_bytes(src.read())
        md5s[name] = file_md5(target)
        expected = entry.get("md5")
        if expected and expected != md5s[name]:
            raise DataRevisionError(
                f"{data_path}/{name} at {rev!r}: md5 {md5s[name]} != {expected}"
            )
    refs = {
        split: TableRef(
            path=str(out_dir / f"{split}.parquet"),
            rows=pq.ParquetFile(out_dir / f"{split}.parquet").metadata.num_rows,
            md5=md5s[f"{split}.parquet"],
        )
        for split in ("train", "eval")
    }
    version = DataVersion(
        dir_md5=pointer["outs"][0]["md5"],
        train_md5=md5s["train.parquet"],
        eval_md5=md5s["eval.parquet"],
        dvc_file=f"{data_path}.dvc@{rev}",
        remote_url=None,
    )
    return IngestResult(train=refs["train"], eval=refs["eval"]), version
