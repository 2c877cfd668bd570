"""The CSV reader: pandas parses the rows, the csv module numbers their file lines."""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import pandas as pd

from steps.data.batch import BATCH_ROWS, Batch, raw_lines
from steps.data.local_files import UNREADABLE, IngestError, LocalFile, one_line, open_file

__all__ = ["csv_batches"]

T = TypeVar("T")

# The csv module's default cap (131,072 characters a field) would stop the line numbering on
# one long document; pandas, which parses the rows, has no cap.
CSV_FIELD_LIMIT = 2**31 - 1


def _csv_records(file: LocalFile) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of each CSV record, header included, 1-based, by the
    csv module: pandas gives no line numbers, and a quoted field may hold newlines. Blank
    lines are skipped, as pandas skips them."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        with open_file(file) as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="replace", newline="")
            reader = csv.reader(text)
            start = 1
            for record in reader:
                if record and (len(record) > 1 or record[0].strip()):
                    yield start, reader.line_num, record
                start = reader.line_num + 1
    except csv.Error as error:
        raise IngestError(f"{file.shown}: line {start}: malformed CSV ({error})") from None
    except UNREADABLE as error:
        raise file.unreadable(error) from None


def _lines_named(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _check_header(file: LocalFile, line: int, header: list[str]) -> None:
    """A header that cannot hold the columns a config names: one column that holds another
    delimiter (a ';'- or tab-separated file), or a name twice (pandas would rename one)."""
    if len(header) == 1 and (found := next((d for d in ";\t|" if d in header[0]), None)):
        name = {";": "';'", "\t": "tab", "|": "'|'"}[found]
        raise IngestError(
            f"{file.shown}: line {line}: the header is one column {header[0][:80]!r}, so the "
            f"configured columns are missing; the file looks {name}-separated, but Sift reads "
            f"comma-separated CSV: save it with ',' between columns (or as JSONL)"
        )
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise IngestError(
                f"{file.shown}: line {line}: column {name!r} appears twice in the header (which "
                "one counts is ambiguous); rename one"
            )
        seen.add(name)


def _csv_failure(file: LocalFile, error: Exception) -> IngestError:
    """pandas' parse error, named by file line: pandas counts records, not lines."""
    width, start = None, None
    for start, last, fields in _csv_records(file):
        if width is None:
            width = len(fields)
        elif len(fields) > width:
            return IngestError(
                f"{file.shown}: {_lines_named(start, last)}: {len(fields)} fields where the "
                f"header has {width} (a ',' inside a field needs the field in double quotes)"
            )
    message = one_line(error)
    if "EOF inside string" in message and start is not None:
        return IngestError(
            f"{file.shown}: line {start}: a quoted field opens here and is never closed"
        )
    return IngestError(f"{file.shown}: malformed CSV ({message})")


def _first_bad_bytes(file: LocalFile, error: UnicodeDecodeError) -> IngestError:
    """pandas' decode error, named by file line (pandas names a byte of a chunk)."""
    for number, raw in raw_lines(file):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return IngestError(
                f"{file.shown}: not valid UTF-8 at line {number} (byte {bad.start} of the "
                f"line: {raw[bad.start : bad.start + 4]!r})"
            )
    return IngestError(f"{file.shown}: not valid UTF-8 (byte {error.start} of a chunk)")


def _strict(file: LocalFile, step: Callable[[], T]) -> T | None:
    """One step of pandas' CSV reader (open, or the next chunk) as an IngestError on any
    failure, None at no data. Strict: pandas' ParserWarning is an error, for a record with
    more fields than the header that pandas would otherwise take as the index (shifting
    every column) or cut short. The warning filter is set for this step only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return step()
    except UnicodeDecodeError as error:
        raise _first_bad_bytes(file, error) from None
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as error:
        raise _csv_failure(file, error) from None
    except UNREADABLE as error:
        raise file.unreadable(error) from None


def _csv_frames(file: LocalFile) -> Iterator[pd.DataFrame]:
    with open_file(file) as handle:
        options = {"dtype": str, "keep_default_na": False, "index_col": False}
        reader = _strict(
            file,
            lambda: pd.read_csv(handle, chunksize=BATCH_ROWS, encoding="utf-8", **options),
        )
        while reader is not None:
            frame = _strict(file, lambda: next(reader, None))
            if frame is None:
                return
            yield frame


def csv_batches(file: LocalFile) -> Iterator[Batch]:
    """CSV batches whose rows name their file lines. Each line is checked against the row
    pandas parsed (same first field); from the first disagreement on (an odd dialect) the
    rest of the file is named by record number, which is never wrong, only less direct."""
    records = _csv_records(file)
    header = next(records, None)
    if header is None:
        return
    line_of_header, _, names = header
    _check_header(file, line_of_header, names)
    lines: Iterator[tuple[int, int, list[str]]] | None = records
    first = 1
    for frame in _csv_frames(file):
        firsts = frame.iloc[:, 0].tolist() if len(frame.columns) else [None] * len(frame)
        places = []
        for number, cell in enumerate(firsts, start=first):
            line, _, fields = next(lines, (None, None, [])) if lines else (None, None, [])
            if len(fields) > len(names):  # pandas read it: only the strictness above stops it
                raise _csv_failure(file, ValueError("a record with extra fields"))
            if line is None or fields[0] != cell:
                lines = None
                places.append(f"record {number}")
            else:
                places.append(f"line {line}")
        yield Batch(frame.reset_index(drop=True), places)
        first += len(frame)
