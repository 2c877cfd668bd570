"""The files a local source is read from: listed and checked before any byte of them is read.

A source is a file or a folder. A data file is named <name>.<format>[.<compression>]:
format .jsonl, .json, .csv, .txt or .parquet; compression .gz, .bz2, .xz or .zst, for the
text formats only (Parquet compresses inside the file), decompressed as it streams.

A folder is read whole or not at all: every data file under it, in sub-folders and symlinked
sub-folders too, in sorted path order; any other file in it (README.md, LICENSE, a.tsv,
b.parquet.gz, a broken link) stops the read, all of them named, so that nothing in it is
silently left out. Names starting with '.' or '_' are skipped, files and folders alike, as
pyarrow.dataset and Hadoop skip them: tools keep their own files there (.git/, .DS_Store,
macOS ._ files, .ipynb_checkpoints/, Spark's _SUCCESS and _temporary/ half-written parts).

Every file, once symlinks are followed, must lie inside the allowed roots (data.allowed_roots):
a link in a data folder to /etc/passwd is refused, naming the setting, the link and its
target (steps/paths.py), and it is never read nor hashed.
"""

from __future__ import annotations

import io
import lzma
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO

import pyarrow as pa

from steps.paths import PathOutsideRoots, inside_roots, tree_inside_roots

FORMATS = (".jsonl", ".json", ".csv", ".txt", ".parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# Suffixes that make a source name a local file (not a hub id) even before it exists.
LOCAL_SUFFIXES = {*FORMATS, *COMPRESSIONS}
HIDDEN_PREFIXES = (".", "_")
DATA_NAMES = (
    "data files end in .jsonl, .json, .csv, .txt or .parquet, the text ones optionally "
    "compressed (.gz, .bz2, .xz, .zst)"
)
# What reading or decompressing a file may raise (ArrowInvalid is also a ValueError, for
# a corrupt zstd or gzip stream; a truncated xz stream raises EOFError).
UNREADABLE: tuple[type[Exception], ...] = (OSError, EOFError, lzma.LZMAError, pa.ArrowException)
SHOWN_FILES = 8  # a folder's refused files named in one line; the rest are counted


class IngestError(ValueError):
    """Raised for unreadable or ill-formed input; the message names the file, line or field."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (pandas and pyarrow messages may end in newlines)."""
    return " ".join(str(error).split())


@dataclass(frozen=True)
class LocalFile:
    """One data file of a source, checked."""

    path: Path  # resolved (symlinks followed), inside the allowed roots: what is read
    shown: Path  # as the user sees it (the link, not its target): what messages name
    name: str  # under the source folder ("sub/a.jsonl"); "" for a file source
    format: str  # one of FORMATS
    compression: str | None  # a pyarrow codec name, "xz", or None

    def unreadable(self, error: BaseException, where: str = "") -> IngestError:
        """A read or decompression error as one line; `where`: the line it stopped at."""
        how = f"{self.compression} data" if self.compression else "the file"
        return IngestError(
            f"{self.shown}: {where + ': ' if where else ''}cannot read {how} "
            f"({type(error).__name__}: {one_line(error)})"
        )


def data_format(name: str) -> tuple[str, str | None] | None:
    """(format, compression) of a data file's name, e.g. 'a.jsonl.gz' -> ('.jsonl', 'gzip');
    None for any other name."""
    path = PurePath(name.lower())
    compression = COMPRESSIONS.get(path.suffix)
    if compression is not None:
        path = PurePath(path.stem)
    if path.suffix not in FORMATS or (compression and path.suffix == ".parquet"):
        return None
    return path.suffix, compression


@contextmanager
def open_file(file: LocalFile) -> Iterator[IO[bytes]]:
    """The file's bytes as a binary stream, decompressed as read."""
    if file.compression is None:
        with file.path.open("rb") as handle:
            yield handle
    elif file.compression == "xz":  # not one of pyarrow's codecs
        with lzma.open(file.path, "rb") as unpacked:
            yield unpacked
    else:  # C++ codecs: zstd with no extra dependency, gzip and bz2 faster than Python's
        stream = pa.input_stream(str(file.path), compression=file.compression)
        with io.BufferedReader(stream) as buffered:
            yield buffered


def _inside(path: Path, roots: Sequence[Path], setting: str) -> Path:
    try:
        return inside_roots(path, roots, setting)
    except PathOutsideRoots as error:
        raise IngestError(str(error)) from None


def _walk(
    folder: Path,
    prefix: str,
    roots: Sequence[Path],
    setting: str,
    above: frozenset[Path],
) -> Iterator[tuple[str, Path, Path | None]]:
    """(name under the source folder, path, resolved path) of each file below `folder`,
    sorted, each checked against `roots`; symlinked folders are followed (`above`: the
    resolved folders that hold this one, so that a link back up is an error, not a loop).
    Hidden names (HIDDEN_PREFIXES) are skipped, except a hidden file named
    like a data file ('_part-3.jsonl'): it comes with no resolved path, for the caller to
    refuse by name."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise IngestError(f"{setting}: cannot list folder {folder} ({one_line(error)})") from None
    for entry in entries:
        if entry.name.startswith(HIDDEN_PREFIXES):
            if data_format(entry.name) is not None and not entry.is_dir():
                # named like data but skipped by the rule: said, never silently left out
                yield f"{prefix}{entry.name}", entry, None
            continue
        target = _inside(entry, roots, setting)
        if target.is_dir():
            if target in above:
                raise IngestError(
                    f"{setting} '{entry}' links to {target}, a folder that holds it (a loop)"
                )
            inner = f"{prefix}{entry.name}/"
            yield from _walk(entry, inner, roots, setting, above | {target})
        else:
            yield f"{prefix}{entry.name}", entry, target


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_FILES])
    return shown if len(names) <= SHOWN_FILES else f"{shown} and {len(names) - SHOWN_FILES} more"


def _folder_files(folder: Path, roots: Sequence[Path], setting: str) -> list[LocalFile]:
    files, refused = [], []
    for name, entry, target in _walk(folder, "", roots, setting, frozenset({folder.resolve()})):
        kind = data_format(name)
        if target is None:
            refused.append(f"{name} (a data file with a hidden name)")
        elif kind is None or not target.is_file():
            refused.append(name if target.is_file() else f"{name} (not a regular file)")
        else:
            files.append(LocalFile(target, entry, name, *kind))
    if refused:
        raise IngestError(
            f"{setting} folder '{folder}' holds {len(refused)} file(s) it would not read: "
            f"{_listed(refused)}; {DATA_NAMES}, and names starting with '.' or '_' are "
            f"skipped: rename them or move them out of the folder, or set {setting} to one file"
        )
    if not files:
        raise IngestError(f"{setting} folder '{folder}' holds no data files ({DATA_NAMES})")
    return files


def local_files(path: Path, roots: Sequence[Path], setting: str) -> list[LocalFile]:
    """The data files a local source is read from: the file itself, or each data file under
    the folder. All are listed and checked here, before any is read: each resolves inside
    `roots` (resolved, see steps.paths.resolved_roots), and a folder holds nothing else.
    `setting` (data.source, ...) names the source in errors."""
    target = _inside(path, roots, setting)
    if target.is_dir():
        return _folder_files(path, roots, setting)
    if not target.is_file():
        raise IngestError(f"{setting} '{path}' is not a regular file")
    kind = data_format(path.name)
    if kind is None:
        suffixes = PurePath(path.name.lower()).suffixes
        suffix = "".join(
            suffixes[-2:] if suffixes[-1:] and suffixes[-1] in COMPRESSIONS else suffixes[-1:]
        )
        raise IngestError(f"{path}: unsupported format '{suffix}' ({DATA_NAMES})")
    return [LocalFile(target, path, "", *kind)]


def all_files(path: Path, roots: Sequence[Path], setting: str) -> list[Path]:
    """Every file of a local source, hidden ones too (what `datasets.load_dataset` may read of
    a folder), resolved and checked against `roots` (steps/paths.py tree_inside_roots)."""
    try:
        return tree_inside_roots(path, roots, setting)
    except PathOutsideRoots as error:
        raise IngestError(str(error)) from None
