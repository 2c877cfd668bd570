"""Streaming readers: each yields a source in batches of rows, never the whole file at once.

What is read (steps/data/local_files.py lists it): a file, or every data file under a folder.
A data file is <name>.<format>[.<compression>], format .jsonl, .json, .csv, .txt or
.parquet, text formats optionally .gz, .bz2, .xz or .zst, decompressed as they stream.

A batch carries where each row came from, 1-based: "line 7" for JSONL, text and CSV (a CSV's
header is line 1; a quoted field may span lines, the record's first line is named), "record 7"
for JSON arrays, Parquet and hub datasets; in a compressed file, the line of the decompressed
text. Errors found later (a non-string field, bytes that are not UTF-8, a failed validation)
name that exact place. Bad input of any kind is one IngestError naming the file and the
line, record or field, never a traceback. A UTF-8 byte-order mark opening a text file is
dropped, whatever its format. A JSON object naming one key twice is refused (which value
counts would be a guess).
A JSON array is the one exception to streaming: it is parsed whole (use JSONL for large data).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steps.data.batch import BATCH_ROWS, BOM, Batch, raw_lines
from steps.data.csv_reader import csv_batches
from steps.data.local_files import (
    UNREADABLE,
    IngestError,
    LocalFile,
    local_files,
    one_line,
    open_file,
)

__all__ = ["BATCH_ROWS", "Batch", "IngestError", "iter_hub", "iter_local"]


def _decode(raw: bytes, shown: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise IngestError(
            f"{shown}: line {number} is not valid UTF-8 (byte {error.start} of the line: "
            f"{raw[error.start : error.start + 4]!r})"
        ) from None


def _lines(file: LocalFile) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers, read in binary so bad bytes get a line."""
    for number, raw in raw_lines(file):
        if raw.strip():
            yield number, _decode(raw, file.shown, number).rstrip("\r\n")


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


class _Repeated(dict):
    """A JSON object that names a key twice (json keeps the last value): `key` is the first
    one repeated."""

    key = ""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    record = dict(pairs)
    if len(record) == len(pairs):
        return record
    repeated = _Repeated(record)
    seen: set[str] = set()
    repeated.key = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
    return repeated


# One decoder for every line (json.loads with a hook would build one per call).
_JSON = json.JSONDecoder(object_pairs_hook=_object)


def _check_record(record: dict, shown: Path, place: str, escaped: bool = True) -> None:
    """A JSON object as a row: each key once, and (where escapes may smuggle lone surrogates
    in: `escaped`) keys and values that are valid UTF-8."""
    if isinstance(record, _Repeated):
        raise IngestError(
            f"{shown}: {place}: key {record.key!r} appears twice in one object (which value "
            f"counts is ambiguous); keep one"
        )
    if not escaped:
        return
    for field, value in record.items():
        _check_encodable(field, shown, place, f"key {field!r}")
        if isinstance(value, str):
            _check_encodable(value, shown, place, f"field '{field}'")


def _check_encodable(text: str, shown: Path, place: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise IngestError(
            f"{shown}: {place}: {what} is not valid UTF-8 "
            f"({error.reason}: {text[error.start]!r} at character {error.start})"
        ) from None


def _parse_json(text: str) -> Any:
    """json, with the errors that are not JSONDecodeError (a 5,000-digit integer is a
    ValueError, deep nesting a RecursionError) as JSONDecodeError-like text."""
    try:
        return _JSON.decode(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as error:
        raise ValueError(one_line(error) or type(error).__name__) from None


def _jsonl_records(file: LocalFile) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(file):
        try:
            record = _parse_json(line)
        except json.JSONDecodeError as error:
            raise IngestError(
                f"{file.shown}: line {number} is not valid JSON ({error.msg} at column "
                f"{error.colno})"
            ) from None
        except ValueError as error:
            raise IngestError(f"{file.shown}: line {number} is not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise IngestError(
                f"{file.shown}: line {number} is a JSON {type(record).__name__}, expected an object"
            )
        # only escapes can smuggle in lone surrogates (not UTF-8)
        _check_record(record, file.shown, f"line {number}", escaped="\\u" in line)
        yield f"line {number}", record


def _text_records(file: LocalFile) -> Iterator[tuple[str, dict]]:
    for number, line in _lines(file):
        yield f"line {number}", {"text": line}


def _read_all(file: LocalFile) -> bytes:
    try:
        with open_file(file) as handle:
            return handle.read().removeprefix(BOM)
    except UNREADABLE as error:
        raise file.unreadable(error) from None


def _json_records(file: LocalFile) -> Iterator[tuple[str, dict]]:
    data = _read_all(file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise IngestError(
            f"{file.shown}: line {line} is not valid UTF-8 (byte {error.start} of the file: "
            f"{data[error.start : error.start + 4]!r})"
        ) from None
    try:
        records = _parse_json(text)
    except json.JSONDecodeError as error:
        raise IngestError(
            f"{file.shown}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None
    except ValueError as error:
        raise IngestError(f"{file.shown}: invalid JSON ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise IngestError(f"{file.shown}: expected a JSON array of objects (one per example)")
    for index, record in enumerate(records, start=1):
        _check_record(record, file.shown, f"record {index}")
        yield f"record {index}", record


def _check_utf8(batch: pa.RecordBatch, file: LocalFile, first: int) -> None:
    """Parquet string columns hold UTF-8 by the format's spec, but nothing enforces it: a
    string that is not would reach the staged table as lone surrogates."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            for index, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
                try:
                    raw is None or raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise IngestError(
                        f"{file.shown}: record {first + index}: field '{name}' is not valid "
                        f"UTF-8 (byte {error.start} of the value: "
                        f"{raw[error.start : error.start + 4]!r})"
                    ) from None
            raise IngestError(
                f"{file.shown}: record {first} on cannot be read: corrupt Parquet data "
                f"(column '{name}' fails validation)"
            ) from None


def _parquet_batches(file: LocalFile) -> Iterator[Batch]:
    try:
        parquet = pq.ParquetFile(file.path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise IngestError(
            f"{file.shown}: not a readable Parquet file ({one_line(error)})"
        ) from None
    batches = parquet.iter_batches(batch_size=BATCH_ROWS)
    first = 1
    while True:
        try:  # a corrupt page surfaces only here, as its batch is decoded
            batch = next(batches, None)
            frame = None if batch is None else batch.to_pandas()
        # pyarrow's I/O and codec errors, and whatever the pandas metadata in the file
        # makes to_pandas raise when it is damaged (KeyError, TypeError, ...)
        except Exception as error:
            raise IngestError(
                f"{file.shown}: record {first} on cannot be read: corrupt Parquet data "
                f"({one_line(error)})"
            ) from None
        if frame is None:
            return
        _check_utf8(batch, file, first)
        places = [f"record {first + i}" for i in range(len(frame))]
        yield Batch(frame.reset_index(drop=True), places)
        first += len(frame)


def _iter_file(file: LocalFile) -> Iterator[Batch]:
    """Batches of one data file, dispatched on its format."""
    if file.format == ".jsonl":
        yield from _batched(_jsonl_records(file))
    elif file.format == ".txt":
        yield from _batched(_text_records(file))
    elif file.format == ".json":
        yield from _batched(_json_records(file))
    elif file.format == ".csv":
        yield from csv_batches(file)
    else:
        yield from _parquet_batches(file)


def iter_local(path: Path, roots: Sequence[Path], setting: str) -> Iterator[Batch]:
    """Batches of a local file, or of every data file under a folder in sorted path order
    (deterministic). Every file is listed and checked (steps/data/local_files.py: inside
    `roots` once symlinks are followed, a data file) when this is called, before any is read;
    `setting` (data.source, ...) names the path in errors."""
    return _read(local_files(path, roots, setting))


def _read(files: list[LocalFile]) -> Iterator[Batch]:
    for file in files:
        for batch in _iter_file(file):
            if file.name:  # a folder's file: sub-folders may repeat a name, so its path
                yield Batch(batch.frame, [f"{file.name} {place}" for place in batch.where])
            else:
                yield batch


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
