"""Any bytes ingest: valid files in every format, mutated (flipped and inserted bytes,
truncation, odd unicode, byte-order marks, random bytes, compressed and then corrupted),
either give rows or stop with one IngestError line naming the file; never a traceback.
So do well-formed files of odd records (any keys, nested values, numbers, nulls) under any
field settings.

Bounded for CI: a fixed number of examples per format, derandomized, no example database
(~5 s in all). Run with more examples (EXAMPLES, derandomize=False) after changing a reader.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from steps.data.ingest import IngestConfig, IngestError, ingest
from tests.conftest import GSM8K_DIR, read_jsonl

EXAMPLES = 60  # per format and test: 480 in all, ~5 s on one core
# Reproducible in CI: derandomized, no example database, no time limit per example.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROWS = read_jsonl(GSM8K_DIR / "train.jsonl", 6)
COMPRESSORS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "zst": lambda data: pa.compress(data, codec="zstd", asbytes=True),
}
# Inserted at random places: JSON escapes of lone surrogates, BOMs, NUL, line and paragraph
# separators, bidi controls, delimiters and quotes, huge numbers, deep nesting, a duplicate
# key, and byte sequences that are not UTF-8 (a UTF-8-encoded surrogate, an overlong '/').
ODD = [
    b"\\ud800",
    b"\\udc80\\ud800",
    "\ufeff".encode(),
    b"\x00",
    "\u2028\u2029".encode(),
    "\u202e\U0001f600e\u0301".encode(),
    b"\r",
    b"\r\n",
    b'"',
    b",",
    b";",
    b"\t",
    b"{",
    b"}",
    b"[",
    b"\\",
    b"\\u0000",
    b"1e999",
    b"9" * 5000,
    b"[" * 5000,
    b'"question": "twice", ',
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xff",
]


def _seed(form: str) -> bytes:
    frame = pd.DataFrame(ROWS)[["question", "answer"]]
    if form == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in frame.to_dict("records")).encode()
    if form == "json":
        return json.dumps(frame.to_dict("records")).encode()
    if form == "csv":
        return frame.to_csv(index=False).encode()
    if form == "txt":
        return "\n".join(frame.question).encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer, compression="snappy")
    return buffer.getvalue()


@st.composite
def _mutated(draw, data: bytes) -> bytes:
    """`data` with one kind of damage (or none)."""
    kinds = ["none", "flip", "truncate", "insert", "odd", "odd in place", "bom", "random"]
    kind = draw(st.sampled_from(kinds))
    data = bytearray(data)
    position = st.integers(0, max(len(data) - 1, 0))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(position)] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(position) :]
    elif kind == "insert":
        at = draw(position)
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "odd":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(position)
            data[at:at] = draw(st.sampled_from(ODD))
    elif kind == "odd in place":  # where structure is: in a key, at a field or line end
        places = [m.end() for m in re.finditer(rb'\{"|,|\n', bytes(data))] or [0]
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.sampled_from(places))
            data[at:at] = draw(st.sampled_from(ODD))
    elif kind == "bom":
        data[:0] = b"\xef\xbb\xbf"
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


@st.composite
def _files(draw, form: str) -> tuple[str, bytes]:
    """A file name and its bytes: mutated, maybe compressed (text formats) and then maybe
    cut short or flipped in the compressed stream."""
    data = draw(_mutated(_seed(form)))
    if form == "parquet" or draw(st.booleans()):
        return f"fuzz.{form}", data
    suffix = draw(st.sampled_from(sorted(COMPRESSORS)))
    packed = bytearray(COMPRESSORS[suffix](data))
    damage = draw(st.sampled_from(["none", "none", "flip", "truncate"]))
    at = draw(st.integers(0, len(packed) - 1))
    if damage == "flip":
        packed[at] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        del packed[at:]
    return f"fuzz.{form}.{suffix}", bytes(packed)


@pytest.fixture(scope="module")
def fuzz_project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("fuzz")
    (project / "eval.jsonl").write_bytes(_seed("jsonl"))
    return project


@pytest.mark.parametrize("form", ["jsonl", "json", "csv", "txt", "parquet"])
def test_any_bytes_give_rows_or_one_line_naming_the_file(fuzz_project: Path, form: str):
    @FUZZ
    @given(_files(form))
    def check(file: tuple[str, bytes]) -> None:
        name, data = file
        path = fuzz_project / name
        path.write_bytes(data)
        config = IngestConfig(source=name, eval_source="eval.jsonl", eval_limit=2)
        try:
            staged = ingest(config, fuzz_project, fuzz_project / "staging")
        except IngestError as error:
            message = str(error)
            assert "fuzz." in message and "\n" not in message, message
        else:
            assert staged.train.rows > 0
        finally:
            path.unlink()

    check()


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
_KEYS = st.sampled_from(["question", "answer", "id", "text", "", "question "]) | st.text(max_size=6)
_RECORDS = st.lists(st.dictionaries(_KEYS, _VALUES, max_size=5), max_size=6)


def _write_records(path: Path, records: list[dict]) -> bool:
    """The records in path's format; False where the format cannot hold them."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        cells = [
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in records
        ]
        pd.DataFrame.from_records(cells).to_csv(path, index=False)
    else:
        try:  # pyarrow infers one type per column: mixed columns (or ints past 64 bits) do not fit
            pq.write_table(pa.Table.from_pylist(records), path)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return False
    return True


@pytest.mark.parametrize("form", ["jsonl", "csv", "parquet"])
def test_odd_records_under_any_fields_give_rows_or_one_line(fuzz_project: Path, form: str):
    @FUZZ
    @given(
        _RECORDS,
        st.sampled_from([None, "id", "auto"]),
        st.sampled_from(["question", "{question} {answer}", "text"]),
        st.sampled_from([None, "text", "answer"]),
    )
    def check(records: list[dict], id_field, prompt_field: str, text_field) -> None:
        path = fuzz_project / f"fuzz.{form}"
        if not _write_records(path, records):
            return
        config = IngestConfig(
            source=path.name,
            eval_source="eval.jsonl",
            eval_limit=2,
            id_field=id_field,
            prompt_field=prompt_field,
            text_field=text_field,
        )
        try:
            ingest(config, fuzz_project, fuzz_project / "staging")
        except IngestError as error:  # the eval file is good, but not under every setting
            message = str(error)
            assert ("fuzz." in message or "eval.jsonl" in message) and "\n" not in message
        finally:
            path.unlink()

    check()
