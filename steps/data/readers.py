"""Streaming readers: each yields a source in batches of rows, never the whole file at once.

A batch carries where each row came from, 1-based: "line 7" for JSONL, text and CSV (a CSV's
header is line 1; a quoted field may span lines, the record's first line is named), "record 7"
for JSON arrays, Parquet and hub datasets. Errors found later (a non-string field, bytes that
are not UTF-8, a failed validation) name that exact place.
A JSON array is the one exception to streaming: it is parsed whole (use JSONL for large data).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}
# Rows per batch: ~5 MB of GSM8K-sized text; memory stays flat whatever the file size.
BATCH_ROWS = 10_000


class IngestError(ValueError):
    """Raised for unreadable or ill-formed input; the message names the file, line or field."""


@dataclass(frozen=True)
class Batch:
    frame: pd.DataFrame
    where: list[str]  # per row: "line N" (JSONL, text, CSV) or "record N" (1-based)


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise IngestError(
            f"{path}: line {number} is not valid UTF-8 (byte {error.start} of the line: "
            f"{raw[error.start : error.start + 4]!r})"
        ) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers, read in binary so bad bytes get a line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, _decode(raw, path, number).rstrip("\r\n")


def _batched(rows: Iterator[tuple[str, dict]]) -> Iterator[Batch]:
    records: list[dict] = []
    where: list[str] = []
    for place, record in rows:
        records.append(record)
        where.append(place)
        if len(records) == BATCH_ROWS:
            yield Batch(pd.DataFrame.from_records(records), where)
            records, where = [], []
    if records:
        yield Batch(pd.DataFrame.from_records(records), where)


def _check_encodable(record: dict, path: Path, place: str) -> None:
    for field, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise IngestError(
                    f"{path}: {place}: field '{field}' is not valid UTF-8 "
                    f"({error.reason}: {value[error.start]!r} at character {error.start})"
                ) from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise IngestError(
                f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise IngestError(
                f"{path}: line {number} is a JSON {type(record).__name__}, expected an object"
            )
        if "\\u" in line:  # only escapes can smuggle in lone surrogates (not UTF-8)
            _check_encodable(record, path, f"line {number}")
        yield f"line {number}", record


def _text_records(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(path):
        yield f"line {number}", {"text": line}


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}: not valid UTF-8 at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise IngestError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise IngestError(f"{path}: expected a JSON array of objects (one per example)")
    for index, record in enumerate(records, start=1):
        _check_encodable(record, path, f"record {index}")
        yield f"record {index}", record


def _frames_with_records(frames: Iterator[pd.DataFrame]) -> Iterator[Batch]:
    first = 1
    for frame in frames:
        places = [f"record {first + i}" for i in range(len(frame))]
        yield Batch(frame.reset_index(drop=True), places)
        first += len(frame)


def _csv_record_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(first line, first field) of each CSV record after the header, 1-based, by the csv
    module: pandas gives no line numbers, and a quoted field may hold newlines. Blank lines
    are skipped, as pandas skips them; a csv.Error (e.g. a field above csv.field_size_limit)
    ends the numbering."""
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        try:
            next(reader, None)  # the header
            start = reader.line_num + 1
            for record in reader:
                if record:
                    yield start, record[0]
                start = reader.line_num + 1
        except csv.Error:
            return


def _frames_with_lines(frames: Iterator[pd.DataFrame], path: Path) -> Iterator[Batch]:
    """CSV batches whose rows name their file lines. Each line is checked against the row
    pandas parsed (same first field); from the first disagreement on (an odd dialect) the
    rest of the file is named by record number, which is never wrong, only less direct."""
    lines: Iterator[tuple[int, str]] | None = _csv_record_lines(path)
    first = 1
    for frame in frames:
        firsts = frame.iloc[:, 0].tolist() if len(frame.columns) else [None] * len(frame)
        places = []
        for number, cell in enumerate(firsts, start=first):
            line, field = next(lines, (None, None)) if lines is not None else (None, None)
            if line is None or field != cell:
                lines = None
                places.append(f"record {number}")
            else:
                places.append(f"line {line}")
        yield Batch(frame.reset_index(drop=True), places)
        first += len(frame)


def _csv_frames(path: Path) -> Iterator[pd.DataFrame]:
    try:
        yield from pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=BATCH_ROWS)
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}: not valid UTF-8 (byte {error.start} of a chunk)") from None
    except pd.errors.EmptyDataError:
        return
    except pd.errors.ParserError as error:
        raise IngestError(f"{path}: malformed CSV ({error})") from None


def _parquet_frames(path: Path) -> Iterator[pd.DataFrame]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise IngestError(f"{path}: not a readable Parquet file ({error})") from None
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
        yield batch.to_pandas()


def iter_file(path: Path) -> Iterator[Batch]:
    """Batches of one local file, dispatched on its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _batched(_jsonl_records(path))
    elif suffix == ".txt":
        yield from _batched(_text_records(path))
    elif suffix == ".json":
        yield from _batched(_json_records(path))
    elif suffix == ".csv":
        yield from _frames_with_lines(_csv_frames(path), path)
    elif suffix == ".parquet":
        yield from _frames_with_records(_parquet_frames(path))
    else:
        raise IngestError(
            f"{path}: unsupported format '{suffix}' (use one of {sorted(LOCAL_SUFFIXES)})"
        )


def iter_local(path: Path) -> Iterator[Batch]:
    """A file, or every supported file under a folder in sorted path order (deterministic)."""
    if path.is_file():
        yield from iter_file(path)
        return
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise IngestError(f"{path}: folder holds no {sorted(LOCAL_SUFFIXES)} files")
    for file in files:
        name = file.relative_to(path).as_posix()  # not just the name: sub-folders may repeat it
        for batch in iter_file(file):
            yield Batch(batch.frame, [f"{name} {place}" for place in batch.where])


def iter_hub(name: str, split: str, revision: str | None) -> Iterator[Batch]:
    """A dataset through `datasets.load_dataset` (hub id, or a local dataset folder)."""
    from datasets import load_dataset  # heavy import, only for hub sources

    try:
        dataset = load_dataset(name, split=split, revision=revision)
    except Exception as error:  # datasets raises many types (offline, missing split, auth)
        raise IngestError(
            f"datasets.load_dataset({name!r}, split={split!r}, revision={revision!r}) failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    first = 1
    for columns in dataset.iter(batch_size=BATCH_ROWS):
        frame = pd.DataFrame(columns)
        yield Batch(frame, [f"record {first + i}" for i in range(len(frame))])
        first += len(frame)
