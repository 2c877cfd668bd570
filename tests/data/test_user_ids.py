"""A user's own example ids survive ingest and validation (data.id_field), while duplicates and
eval leakage are still found by content; validation names rows by file and 1-based line
(JSONL, CSV with its header) or record (JSON arrays, Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from steps.data.ingest import SCHEMA, IngestConfig, IngestError, content_id, ingest
from steps.data.validate import ValidateConfig, validate
from steps.modeling import ModelConfig
from tests.conftest import MODEL_DIR, write_jsonl

MODEL = ModelConfig(name=str(MODEL_DIR))
FAIL = ValidateConfig(on_invalid="fail")


def _with_ids(records: list[dict], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", **r} for i, r in enumerate(records)]


def _data(**fields) -> IngestConfig:
    return IngestConfig(**{"source": "raw/train.jsonl", "eval_source": "raw/test.jsonl", **fields})


def _validate(project: Path, tmp_path: Path, config: ValidateConfig, **data):
    staged = ingest(_data(**data), project, tmp_path / "staging")
    return validate(staged, config, MODEL, tmp_path / "gx", tmp_path / "data")


def test_user_ids_name_the_published_rows_and_content_hashes_stay_the_key(
    project: Path, tmp_path: Path, gsm8k_train, gsm8k_test
):
    write_jsonl(project / "raw" / "train.jsonl", _with_ids(gsm8k_train, "gsm"))
    write_jsonl(project / "raw" / "test.jsonl", _with_ids(gsm8k_test, "held"))
    report = _validate(project, tmp_path, FAIL)
    assert report.success, report.failures
    train = pd.read_parquet(tmp_path / "data" / "train.parquet")
    assert list(train.columns) == SCHEMA  # no places or hashes in the published data
    assert list(train.id) == [f"gsm-{i}" for i in range(80)]
    staged = ingest(_data(), project, tmp_path / "again")
    assert staged.train.staged is not None
    places = pd.read_parquet(staged.train.staged.places_path)
    assert list(places.content_id) == [content_id(r["question"], r["answer"]) for r in gsm8k_train]
    assert places.place[79] == "raw/train.jsonl line 80"

    hashed = pd.read_parquet(ingest(_data(id_field=None), project, tmp_path / "none").train.path)
    assert list(hashed.id) == list(places.content_id)  # null: content hashes, as without ids


def test_without_an_id_column_the_staged_bytes_are_as_before(project: Path, tmp_path: Path):
    auto = ingest(_data(), project, tmp_path / "auto")
    none = ingest(_data(id_field=None), project, tmp_path / "none")
    assert auto.train.md5 == none.train.md5
    table = pd.read_parquet(auto.train.path)
    pairs = zip(table.prompt, table.response, strict=True)
    assert list(table.id) == [content_id(prompt, response) for prompt, response in pairs]


def test_repeated_and_blank_user_ids_fail_naming_lines_and_the_id(
    project: Path, tmp_path: Path, gsm8k_train
):
    rows = _with_ids(gsm8k_train, "gsm")
    rows[4]["id"] = rows[2]["id"]  # a repeated id on different content
    rows[7]["id"] = "  "
    write_jsonl(project / "raw" / "train.jsonl", rows)
    report = _validate(project, tmp_path, FAIL)
    assert (
        "[train] expect_column_values_to_be_unique on column 'id' (2 rows) - data.id_field ids "
        "repeat; raw/train.jsonl line 3 ('gsm-2'), raw/train.jsonl line 5 ('gsm-2')"
    ) in report.failures
    assert (
        "[train] expect_column_values_to_not_match_regex on column 'id' (1 rows) - data.id_field "
        "id is empty or whitespace; raw/train.jsonl line 8 ('  ')"
    ) in report.failures
    assert not any("content_id" in failure for failure in report.failures)

    quarantine = ValidateConfig(max_quarantine_fraction=0.05)
    kept = _validate(project, tmp_path / "q", quarantine)
    assert kept.success and kept.quarantined == 3
    assert [note.split(":")[0] for note in kept.quarantined_rows] == [
        "[train] raw/train.jsonl line 3",
        "[train] raw/train.jsonl line 5",
        "[train] raw/train.jsonl line 8",
    ]


def test_duplicates_and_leaks_are_found_by_content_whatever_the_ids(
    project: Path, tmp_path: Path, gsm8k_train, gsm8k_test
):
    train = _with_ids(gsm8k_train, "gsm")
    train[9] = {**train[1], "id": "gsm-copy"}
    held = [*_with_ids(gsm8k_test, "held"), {**train[30], "id": "held-leak"}]
    write_jsonl(project / "raw" / "train.jsonl", train)
    write_jsonl(project / "raw" / "test.jsonl", held)
    text = "\n".join(_validate(project, tmp_path, FAIL).failures)
    assert (
        "[train] expect_column_values_to_be_unique on column 'content_id' (2 rows) - exact "
        "duplicates: the same prompt and response; raw/train.jsonl line 2 ("
    ) in text
    assert "[eval] expect_column_values_to_not_be_in_set on column 'content_id' (1 rows)" in text
    assert "raw/test.jsonl line 17 (" in text
    assert "on column 'id'" not in text  # the user ids themselves are all distinct


def test_integer_ids_read_as_decimal_text_and_bad_ids_are_errors(project: Path, tmp_path: Path):
    records = [{"uid": i, "question": f"q{i}", "answer": "a"} for i in range(3)]
    records[1]["uid"] = None  # pandas reads the column as floats: 0.0, nan, 2.0
    write_jsonl(project / "raw" / "ints.jsonl", records)
    config = IngestConfig(source="raw/ints.jsonl", eval_source="raw/ints.jsonl", id_field="uid")
    table = pd.read_parquet(ingest(config, project, tmp_path / "ints").train.path)
    assert table.id[0] == "0" and pd.isna(table.id[1]) and table.id[2] == "2"

    write_jsonl(project / "raw" / "floats.jsonl", [{**records[0], "uid": 1.5}])
    floats = config.model_copy(update={"source": "raw/floats.jsonl"})
    with pytest.raises(IngestError, match=r"floats\.jsonl line 1: field 'uid' \(data\.id_field\)"):
        ingest(floats, project, tmp_path / "floats")
    missing = config.model_copy(update={"id_field": "example_id"})
    with pytest.raises(
        IngestError, match=r"raw/ints\.jsonl: data\.id_field = 'example_id' names no column"
    ):
        ingest(missing, project, tmp_path / "missing")


def test_messages_name_csv_lines_and_json_and_parquet_records(
    project: Path, tmp_path: Path, gsm8k_train
):
    frame = pd.DataFrame(gsm8k_train).replace("\n", " ", regex=True)  # one line per row...
    frame.loc[0, "question"] = "a question\nover two lines"  # ...but this: lines 2-3 in CSV
    frame.loc[5, "answer"] = ""
    frame.to_csv(project / "raw" / "train.csv", index=False)
    frame.to_parquet(project / "raw" / "train.parquet")
    (project / "raw" / "train.json").write_text(json.dumps(frame.to_dict("records")))
    (project / "raw" / "pool" / "sub").mkdir(parents=True)
    frame.to_json(project / "raw" / "pool" / "sub" / "a.jsonl", orient="records", lines=True)
    expected = {
        "raw/train.csv": "raw/train.csv line 8 ('')",  # header 1, row 0 on 2-3, row 5 on 8
        "raw/train.parquet": "raw/train.parquet record 6 ('')",
        "raw/train.json": "raw/train.json record 6 ('')",
        "raw/pool": "raw/pool sub/a.jsonl line 6 ('')",
    }
    for source, place in expected.items():
        report = _validate(project, tmp_path / Path(source).name, FAIL, source=source)
        (empty,) = [f for f in report.failures if "value_lengths" in f]
        assert empty.endswith(f"on column 'response' (1 rows); {place}"), empty
