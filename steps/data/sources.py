"""Data sources: local paths resolved, checked against data.allowed_roots, hashed and read."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from steps.data.ingest_config import IngestConfig
from steps.data.local_files import LOCAL_SUFFIXES, all_files, local_files
from steps.data.readers import IngestError, iter_hub, iter_local
from steps.hashing import file_md5
from steps.paths import PathOutsideRoots, inside_roots, resolved_roots

__all__ = [
    "allowed_roots",
    "check_allowed",
    "check_files",
    "local_source",
    "read_source",
    "resolve_local",
    "source_fingerprint",
    "sources_fingerprint",
]


def resolve_local(source: str, project_dir: Path) -> Path | None:
    """A local path (relative to the project) if the source names one; None for a hub id."""
    path = Path(source)
    path = path if path.is_absolute() else project_dir / path
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/")):
        raise IngestError(f"data source not found: {path}")
    return None


def allowed_roots(config: IngestConfig, project_dir: Path) -> list[Path]:
    """data.allowed_roots, resolved (relative entries from the project)."""
    return resolved_roots(config.allowed_roots, project_dir)


def check_allowed(path: Path, setting: str, config: IngestConfig, project_dir: Path) -> Path:
    """The resolved path, if it lies inside data.allowed_roots; an error naming both if not."""
    try:
        return inside_roots(path, allowed_roots(config, project_dir), setting)
    except PathOutsideRoots as error:
        raise IngestError(str(error)) from None


def check_files(path: Path, roots: Sequence[Path], setting: str, config: IngestConfig) -> None:
    """Every file a local source would be read from resolves inside `roots` (and, for Sift's
    readers, is a data file): what `datasets` reads of a folder is checked too."""
    if config.loader == "auto":
        local_files(path, roots, setting)
    else:
        all_files(path, roots, setting)


def _looks_local(source: str) -> bool:
    path = Path(source)
    return source.startswith((".", "/", "~")) or ".." in path.parts or path.suffix in LOCAL_SUFFIXES


def local_source(source: str, setting: str, config: IngestConfig, project_dir: Path):
    """The resolved local path of a source, or None for a hub dataset id. It, and each file
    of a folder, is checked against data.allowed_roots before any read."""
    path = Path(source) if Path(source).is_absolute() else project_dir / source
    if path.exists() or _looks_local(source):
        check_allowed(path, setting, config, project_dir)
        if not path.exists():
            raise IngestError(f"{setting} not found: {path} (relative paths start at the project)")
    if config.loader == "datasets" and not path.exists():
        return None
    local = resolve_local(source, project_dir)
    if local is None:
        return None
    check_files(local.resolve(), allowed_roots(config, project_dir), setting, config)
    return local.resolve()


def sources_fingerprint(config: IngestConfig, project_dir: Path) -> str:
    """A content hash of the local sources (after the allowed-roots check), or the hub ids.

    The flow passes this into the cached ingest task, so editing a file in place
    invalidates the cache.
    """
    parts = []
    for setting, source in (
        ("data.source", config.source),
        ("data.eval_source", config.eval_source),
    ):
        local_source(source, setting, config, project_dir)
        parts.append(source_fingerprint(source, project_dir, config, setting))
    return "".join(parts)


def source_fingerprint(
    source: str,
    project_dir: Path,
    config: IngestConfig | None = None,
    setting: str = "data.source",
) -> str:
    """A content hash of one local source (file or folder), or the id itself for hub datasets.

    Only files that the read would take are hashed, each checked against data.allowed_roots
    first (config's, else the defaults): a link in a data folder to /etc/passwd is refused,
    never hashed."""
    config = config or IngestConfig()
    path = resolve_local(source, project_dir)
    if path is None:
        return f"hub:{source}"
    roots = allowed_roots(config, project_dir)
    if config.loader == "auto":
        named = [(file.name or path.name, file.path) for file in local_files(path, roots, setting)]
    else:
        named = [(p.name, p) for p in all_files(path, roots, setting)]
    return hashlib.md5("".join(f"{name}:{file_md5(p)}" for name, p in named).encode()).hexdigest()


def read_source(
    source: str,
    split: str,
    revision: str | None,
    project_dir: Path,
    config: IngestConfig | None = None,
) -> pd.DataFrame:
    """A whole local file/folder or hub split as one DataFrame (for small inputs only;
    `ingest` streams). Local files are checked against config's data.allowed_roots (else
    the defaults)."""
    path = resolve_local(source, project_dir)
    roots = allowed_roots(config or IngestConfig(), project_dir)
    batches = (
        iter_local(path, roots, "data.source")
        if path is not None
        else iter_hub(source, split, revision)
    )
    frames = [batch.frame for batch in batches]
    if not frames or sum(len(f) for f in frames) == 0:
        raise IngestError(f"{path or source}: no records")
    return pd.concat(frames, ignore_index=True)
