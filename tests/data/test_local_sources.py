"""Folder sources: every file they hold is read, or refused by name, and none is read from
outside data.allowed_roots (a link in a folder to /etc/passwd); compressed files stream."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from steps.data.ingest import IngestConfig, IngestError, ingest
from steps.data.sources import read_source, sources_fingerprint

COMPRESSORS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "zst": lambda data: pa.compress(data, codec="zstd", asbytes=True),
}


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _rows(path: Path, project: Path) -> list[dict]:
    return read_source(str(path), "train", None, project).to_dict("records")


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A folder beside the project, outside its allowed roots, holding a secret."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return folder


@pytest.fixture
def parts(project: Path) -> Path:
    """raw/parts: a folder source holding the pool's first rows."""
    folder = project / "raw" / "parts"
    folder.mkdir()
    train = (project / "raw" / "train.jsonl").read_text().splitlines(keepends=True)
    (folder / "good.jsonl").write_text("".join(train[:40]))
    return folder


def _outside_message(setting: str, link: Path, target: Path) -> str:
    named = f"{setting} '{link}' resolves to {target}, outside data.allowed_roots ["
    return "^" + re.escape(named)


@pytest.mark.parametrize("setting", ["data.source", "data.eval_source"])
def test_a_link_in_a_folder_leading_outside_stops_ingest_before_anything_is_read(
    project: Path, tmp_path: Path, parts: Path, outside: Path, setting: str
):
    (parts / "zz.txt").symlink_to(outside / "secret.txt")  # sorts last: good.jsonl is first
    sources = {"source": "raw/train.jsonl", "eval_source": "raw/test.jsonl"}
    sources["source" if setting == "data.source" else "eval_source"] = "raw/parts"
    config = IngestConfig(**sources)
    message = _outside_message(setting, parts.resolve() / "zz.txt", outside / "secret.txt")
    with pytest.raises(IngestError, match=message) as raised:
        ingest(config, project, tmp_path / "staging")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "staging").exists()  # nothing staged, the pool included
    with pytest.raises(IngestError, match=message):  # the flow's cache key hashes no secret
        sources_fingerprint(config, project)


def test_symlinked_sub_folders_are_read_inside_the_roots_and_refused_outside(
    project: Path, parts: Path, outside: Path
):
    other = project / "raw" / "more"
    other.mkdir()
    (other / "extra.jsonl").write_text(_jsonl([{"question": "q?", "answer": "a."}]))
    (parts / "linked").symlink_to(other)  # inside the project: its file is data too
    assert len(_rows(parts, project)) == 41
    (outside / "part.jsonl").write_text(_jsonl([{"question": "x", "answer": "y"}]))
    (parts / "away").symlink_to(outside)
    with pytest.raises(IngestError, match=_outside_message("data.source", parts / "away", outside)):
        _rows(parts, project)
    (parts / "away").unlink()
    (other / "secret.txt").symlink_to(outside / "secret.txt")  # out, through a linked folder
    link = parts / "linked" / "secret.txt"
    secret = outside / "secret.txt"
    with pytest.raises(IngestError, match=_outside_message("data.source", link, secret)):
        _rows(parts, project)
    (other / "secret.txt").unlink()
    (other / "up").symlink_to(parts)
    with pytest.raises(IngestError, match=r"'.*/parts/linked/up' links to .*parts, a folder "):
        _rows(parts, project)


def test_sift_select_and_a_target_read_a_named_folder_but_no_link_out_of_it(
    project: Path, outside: Path
):
    """`sift select --data` and select.target may name a folder outside the roots; what the
    folder holds must still lie inside it (or the roots)."""
    from steps.data.ingest import named_source_batches
    from steps.selection.target_sample import read_target_prompts

    data = outside / "pool"
    data.mkdir()
    (data / "a.jsonl").write_text(_jsonl([{"question": "q?", "answer": "a."}]))
    config = IngestConfig(source=str(data))
    assert len(next(iter(named_source_batches(config, project))).frame) == 1
    assert read_target_prompts(config, str(data), project) == ["q?"]
    (data / "b.txt").symlink_to(outside / "secret.txt")
    message = _outside_message("data.source", data / "b.txt", outside / "secret.txt")
    with pytest.raises(IngestError, match=message):
        named_source_batches(config, project)
    with pytest.raises(IngestError, match=message.replace("data\\.source", "select\\.target")):
        read_target_prompts(config, str(data), project)


def test_a_folder_with_a_compressed_part_reads_every_row_with_its_line(
    project: Path, tmp_path: Path
):
    train = (project / "raw" / "train.jsonl").read_text().splitlines(keepends=True)
    folder = project / "raw" / "split"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(train[:30]))
    (folder / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(train[30:60]).encode()))
    config = IngestConfig(source="raw/split", eval_source="raw/test.jsonl")
    staged = ingest(config, project, tmp_path / "staging")
    assert staged.train.rows == 60
    places = pd.read_parquet(staged.train.staged.places_path).place.tolist()
    assert places[29:31] == ["raw/split part-0.jsonl line 30", "raw/split part-1.jsonl.gz line 1"]


@pytest.mark.parametrize("suffix", COMPRESSORS)
@pytest.mark.parametrize("form", ["jsonl", "json", "csv", "txt"])
def test_compressed_text_files_give_the_rows_of_the_plain_file(
    project: Path, form: str, suffix: str
):
    records = pd.read_json(project / "raw" / "train.jsonl", lines=True).head(20)
    plain = project / "raw" / f"pool.{form}"
    if form == "jsonl":
        records.to_json(plain, orient="records", lines=True)
    elif form == "json":
        records.to_json(plain, orient="records")
    elif form == "csv":
        records.to_csv(plain, index=False)
    else:
        plain.write_text("\n".join(records.question))
    packed = plain.with_name(f"{plain.name}.{suffix}")
    packed.write_bytes(COMPRESSORS[suffix](plain.read_bytes()))
    assert _rows(packed, project) == _rows(plain, project)


@pytest.mark.parametrize("suffix", COMPRESSORS)
def test_errors_in_compressed_files_name_the_decompressed_line_or_the_break(
    project: Path, suffix: str
):
    lines = (project / "raw" / "train.jsonl").read_bytes().splitlines(keepends=True)
    bad = project / "raw" / f"bad.jsonl.{suffix}"
    bad.write_bytes(COMPRESSORS[suffix](b"".join(lines[:40]) + b"{not json}\n"))
    with pytest.raises(IngestError, match=r"bad\.jsonl\.\w+: line 41 is not valid JSON"):
        _rows(bad, project)
    whole = COMPRESSORS[suffix](b"".join(lines))
    bad.write_bytes(whole[: len(whole) // 2])  # cut off mid-stream
    with pytest.raises(IngestError, match=rf"bad\.jsonl\.{suffix}: line \d+: cannot read \w+ data"):
        _rows(bad, project)


def test_a_folder_holding_other_files_is_refused_naming_them(project: Path, parts: Path):
    for name in ("README.md", "LICENSE", "extra.parquet.gz", ".DS_Store", "_SUCCESS"):
        (parts / name).write_text("not data\n")
    for hidden in (".git", "_temporary"):  # tools' own folders, half-written parts
        (parts / hidden).mkdir()
        (parts / hidden / "part-0.jsonl").write_text("{half\n")
    (parts / "gone.jsonl").symlink_to(parts / "missing.jsonl")
    with pytest.raises(IngestError) as raised:
        _rows(parts, project)
    assert str(raised.value).startswith(
        f"data.source folder '{parts}' holds 4 file(s) it would not read: LICENSE, README.md, "
        "extra.parquet.gz, gone.jsonl (not a regular file); data files end in .jsonl,"
    )
    for name in ("README.md", "LICENSE", "extra.parquet.gz", "gone.jsonl"):
        (parts / name).unlink()
    assert len(_rows(parts, project)) == 40  # hidden names ('.', '_') are skipped


def test_a_data_file_with_a_hidden_name_is_refused_not_skipped(project: Path, parts: Path):
    (parts / "_part-2.jsonl").write_bytes((parts / "good.jsonl").read_bytes())
    with pytest.raises(IngestError, match=r"holds 1 file\(s\) it would not read: _part-2\.jsonl "
                       r"\(a data file with a hidden name\)"):  # fmt: skip
        _rows(parts, project)


def test_a_corrupt_parquet_page_is_one_line_naming_the_file(project: Path):
    import pyarrow.parquet as pq

    frame = pd.read_json(project / "raw" / "train.jsonl", lines=True)
    path = project / "raw" / "pool.parquet"
    pq.write_table(pa.Table.from_pandas(frame), path, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))  # the footer is intact: the file opens
    with pytest.raises(IngestError, match=r"pool\.parquet: record 1 on cannot be read: corrupt "):
        _rows(path, project)


@pytest.mark.parametrize("form", ["jsonl", "json", "csv", "txt", "jsonl.gz"])
def test_a_byte_order_mark_is_dropped_in_every_text_format(project: Path, form: str):
    records = pd.read_json(project / "raw" / "train.jsonl", lines=True).head(5)
    plain = project / "raw" / f"pool.{form}"
    text = {
        "json": lambda: records.to_json(orient="records"),
        "csv": lambda: records.to_csv(index=False),
        "txt": lambda: "\n".join(records.question),
    }.get(form, lambda: records.to_json(orient="records", lines=True))()
    data = text.encode()
    marked = plain.with_name(f"marked.{form}")
    pack = gzip.compress if form.endswith(".gz") else (lambda b: b)
    plain.write_bytes(pack(data))
    marked.write_bytes(pack(b"\xef\xbb\xbf" + data))
    assert _rows(marked, project) == _rows(plain, project)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "dup.jsonl",
            '{"question": "q", "answer": "a"}\n{"question": "a", "question": "b", "answer": "c"}\n',
            r"dup\.jsonl: line 2: key 'question' appears twice in one object",
        ),
        (
            "dup.json",
            '[{"question": "q", "answer": "a"}, {"answer": "c", "answer": "d", "question": "b"}]',
            r"dup\.json: record 2: key 'answer' appears twice in one object",
        ),
        (
            "key.jsonl",
            '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a", "k\\udc80": 1}\n',
            r"key\.jsonl: line 2: key 'k\\udc80' is not valid UTF-8 \(surrogates not allowed",
        ),
        (
            "key.json",
            '[{"question": "q", "answer": "a", "\\ud800": "x"}]',
            r"key\.json: record 1: key '\\ud800' is not valid UTF-8",
        ),
    ],
)
def test_json_keys_named_twice_or_not_utf8_are_one_line_errors(
    project: Path, name: str, content: str, message: str
):
    (project / "raw" / name).write_text(content)
    with pytest.raises(IngestError, match=message) as raised:
        _rows(project / "raw" / name, project)
    assert "\n" not in str(raised.value)


def test_parquet_text_that_is_not_utf8_or_damaged_metadata_is_one_line(project: Path):
    """The Parquet spec says strings are UTF-8, but no writer is made to check; and pandas'
    metadata in the file steers to_pandas, which then fails with a KeyError."""
    import pyarrow.parquet as pq

    bad = pa.array([b"fine", b"\xcebad"], pa.binary()).view(pa.string())
    path = project / "raw" / "pool.parquet"
    pq.write_table(pa.table({"question": bad, "answer": ["a", "b"]}), path)
    message = r"pool\.parquet: record 2: field 'question' is not valid UTF-8 \(byte 0 "
    with pytest.raises(IngestError, match=message):
        _rows(path, project)
    table = pa.table({"question": ["q"], "answer": ["a"]})
    damaged = json.dumps({"index_columns": [], "columns": [{}]}).encode()
    pq.write_table(table.replace_schema_metadata({b"pandas": damaged}), path)
    with pytest.raises(IngestError, match=r"pool\.parquet: record 1 on cannot be read: corrupt"):
        _rows(path, project)
