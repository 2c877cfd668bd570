"""What proves a cached artifact whole before it is used again: an md5 recorded when it was
written, and a readable container (a safetensors header, a zip archive's CRCs).

Each check returns a one-line description of what is wrong, naming the file, or None when the
file is whole; the caller decides what a damaged file costs (compute it again, discard it, or
stop with that line). Plumbing shared by the embedding, training and registry steps.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from steps.hashing import file_md5


class CorruptArtifactError(ValueError):
    """A file a step needs is damaged (its check's line is the message); retrying the step
    reads the same bytes, so a retry cannot help."""


def record_md5(path: Path, record_path: Path) -> str:
    """Writes path's md5 to record_path (write-then-rename: never half a record)."""
    digest = file_md5(path)
    partial = record_path.with_name(f"{record_path.name}.partial")
    partial.write_text(digest)
    os.replace(partial, record_path)
    return digest


def md5_problem(path: Path, recorded: str) -> str | None:
    """path's bytes against the md5 recorded when it was written."""
    if not path.is_file():
        return f"{path} is missing"
    actual = file_md5(path)
    if actual != recorded:
        return f"{path} has md5 {actual}, not the {recorded} recorded when it was written"
    return None


def recorded_md5_problem(path: Path, record_path: Path) -> str | None:
    """md5_problem against the md5 record_md5 left in record_path."""
    try:
        recorded = record_path.read_text().strip()
    except OSError:
        return f"{path} has no recorded md5 ({record_path} is missing)"
    return md5_problem(path, recorded)


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file's header, and that the file holds every byte it promises (what
    from_pretrained fails on with 'header too large' or 'incomplete metadata')."""
    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"{path} is not a readable safetensors file ({error})"


def zip_problem(path: Path) -> str | None:
    """A zip archive (torch.save's format) whose every member matches its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{path} is not a readable archive ({error})"
    return None if bad is None else f"{path}: member {bad} fails its CRC check"
