"""Versioning: DVC tracks the validated data/ folder (data.dvc) and pushes it to a remote."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dvc.api
import pyarrow.parquet as pq
import yaml
from dvc.exceptions import InitError
from dvc.repo import Repo, lock_repo
from dvc.scm import RevError
from pydantic import BaseModel, ConfigDict, Field

from steps.data.ingest import IngestResult, TableRef
from steps.hashing import file_md5


class VersionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Written to .dvc/config.local, so a user's remote never lands in git.
    remote_url: str = Field(
        default=".sift/dvc-remote",
        description="Where the versioned data is pushed: a folder (project-relative) or any DVC "
        "remote URL (s3://bucket/prefix, ...).",
    )
    remote_name: str = Field(
        default="sift", description="Name of that DVC remote in .dvc/config.local."
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store other than AWS (MinIO, Ceph, moto); "
        "credentials come from the usual AWS variables, never from this file.",
    )
    push: bool = Field(
        default=True,
        description="Push the data to the remote after `dvc add`; false keeps it in the local "
        "DVC cache only.",
    )


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
        try:
            Repo.init(str(repo_dir), no_scm=not (repo_dir / ".git").exists())
        except InitError:
            if not (repo_dir / ".dvc").is_dir():
                raise  # not another run's init between the check and ours
    # Waits for DVC's repo lock (`dvc --wait-for-lock`) instead of failing after 3 s: two
    # runs of one project version their data one after the other. The lock is an flock,
    # which the kernel releases when its holder dies.
    return Repo(str(repo_dir), _wait_for_lock=True)


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


def version_data(
    data_dir: Path, repo_dir: Path, config: VersionConfig, source_dir: Path | None = None
) -> DataVersion:
    """`dvc add` data_dir (writing <data_dir>.dvc beside it) and push it to the remote; with
    source_dir, its tables first replace data_dir's.

    All of it holds DVC's repo lock, so two runs of one project version one at a time and
    another run's tables cannot land between this run's add and push. A failure or a stop
    (SIGTERM) before the push completes puts data_dir and the .dvc file back as they were: a
    .dvc file never names data the remote lacks.
    """
    logging.getLogger("dvc").setLevel(logging.WARNING)  # no "git add" hints on every run
    dvc_file = data_dir.parent / f"{data_dir.name}.dvc"
    incoming = None if source_dir is None else _copy_beside(source_dir, data_dir)
    repo = _open_repo(repo_dir)
    try:
        with lock_repo(repo), _restored_on_failure(data_dir, dvc_file, incoming):
            url = _configure_remote(repo, config, repo_dir)
            repo.add(str(data_dir))
            dir_md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
            files = _file_md5s(repo, dir_md5)
            if url is not None:
                # What DVC does whenever a command takes the lock, which nested under ours it
                # does not: drop the index and config read before the add (stale: the push
                # would send nothing).
                repo._reset()
                repo.push(remote=config.remote_name)
    finally:
        repo.close()
        if incoming is not None:
            shutil.rmtree(incoming, ignore_errors=True)  # left only when the copy failed
    return DataVersion(
        dir_md5=dir_md5,
        train_md5=files["train.parquet"],
        eval_md5=files["eval.parquet"],
        dvc_file=str(dvc_file),
        remote_url=url,
    )


def _configure_remote(repo: Repo, config: VersionConfig, repo_dir: Path) -> str | None:
    """The remote's URL, written to .dvc/config.local; None when nothing is pushed."""
    if not config.push:
        return None
    url = _remote_url(config.remote_url, repo_dir)
    with repo.config.edit("local") as local:
        remote = {"url": url}
        if config.endpoint_url:
            remote["endpointurl"] = config.endpoint_url
        local["remote"][config.remote_name] = remote
        local["core"]["remote"] = config.remote_name
    return url


def _copy_beside(source_dir: Path, data_dir: Path) -> Path:
    """A copy of source_dir next to data_dir (same file system: it is renamed into place)."""
    incoming = data_dir.with_name(f".{data_dir.name}.incoming-{uuid.uuid4().hex[:12]}")
    shutil.copytree(source_dir, incoming)
    return incoming


@contextmanager
def _restored_on_failure(data_dir: Path, dvc_file: Path, incoming: Path | None) -> Iterator[None]:
    """Renames `incoming` to data_dir for the body; if the body raises (any BaseException:
    SIGTERM included), data_dir and dvc_file are put back as they were."""
    pointer = dvc_file.read_bytes() if dvc_file.exists() else None
    previous = data_dir.with_name(f".{data_dir.name}.previous-{uuid.uuid4().hex[:12]}")
    if incoming is not None:
        if data_dir.exists():
            data_dir.rename(previous)
        incoming.rename(data_dir)
    try:
        yield
    except BaseException:
        if pointer is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(pointer)
        if incoming is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
            if previous.exists():
                previous.rename(data_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


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
