"""The embedding pass's folder on disk (embed.py computes what goes in it).

chunk-N.npz holds the statistics of the N-th `chunk_examples` examples, written then renamed,
so a killed pass never leaves a half chunk that looks complete; chunk-N.md5 beside it holds its
md5, recorded before the rename by whoever wrote it (one record per chunk, not one shared file:
workers write chunks at once). manifest.json says how the chunks were made: chunks made another
way are deleted. checksums.json holds the md5 of every consolidated .npy, written last.

What is found damaged is named in a warning and computed again, never read: a truncated or
overwritten chunk used to fail every later run in np.load, or be merged silently.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from steps.hashing import file_md5
from steps.integrity import md5_problem, record_md5, recorded_md5_problem
from steps.paths import private_partial

CHECKSUMS = "checksums.json"  # {"factors.npy": md5, ...}
log = logging.getLogger(__name__)


def chunk_path(out_dir: Path, number: int) -> Path:
    return out_dir / f"chunk-{number:05d}.npz"


def _md5_path(chunk: Path) -> Path:
    return chunk.with_suffix(".md5")


def start_folder(out_dir: Path, manifest: dict) -> None:
    """Chunks left by an interrupted pass are reused only if they were made the same way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.json"
    if path.exists() and _read_manifest(path) != manifest:
        for stale in [*out_dir.glob("chunk-*.npz"), *out_dir.glob("chunk-*.md5")]:
            stale.unlink()
    path.write_text(json.dumps(manifest, indent=2))


def _read_manifest(path: Path) -> dict | None:
    """None when unreadable (a damaged manifest): the chunks beside it are then stale."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def drop_corrupt_chunks(out_dir: Path, chunks: int) -> None:
    """Deletes, with a warning naming it, each chunk on disk that no longer matches the md5
    recorded when it was written: it is then missing, so the pass computes it again."""
    for number in range(chunks):
        path = chunk_path(out_dir, number)
        if path.exists() and (problem := recorded_md5_problem(path, _md5_path(path))):
            log.warning("embed: %s; computing that chunk again", problem)
            path.unlink()


def save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write-then-rename, its md5 recorded before the rename: a chunk on disk has its record."""
    partial = private_partial(path)
    with partial.open("wb") as handle:  # a file, not a name: savez would add ".npz" to it
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
    record_md5(partial, _md5_path(path))
    os.replace(partial, path)


def record_checksums(out_dir: Path, names: list[str]) -> None:
    """The md5 of each consolidated file, what folder_problem checks them against."""
    checksums = {name: file_md5(out_dir / name) for name in names}
    partial = private_partial(out_dir / CHECKSUMS)
    partial.write_text(json.dumps(checksums, indent=2))
    os.replace(partial, out_dir / CHECKSUMS)


def folder_problem(folder: Path) -> str | None:
    """One line naming the first consolidated file that no longer matches the md5 recorded
    when it was written (or the record itself, when that is gone); None when all match.

    Reads every byte (~1 s per GB): what a cached pass costs before it is trusted again."""
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError) as error:
        return f"{folder / CHECKSUMS} is unreadable ({error})"
    for name, md5 in recorded.items():
        if problem := md5_problem(folder / name, md5):
            return problem
    return None
