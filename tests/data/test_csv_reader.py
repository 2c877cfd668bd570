"""CSV errors name the file line (pandas counts records, and GSM8K answers span lines), and a
file that is not comma-separated says so instead of a tokenizer error."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from steps.data.ingest import IngestError
from steps.data.sources import read_source


@pytest.fixture
def good_csv(project: Path) -> str:
    """The pool as CSV: each GSM8K answer is a quoted field spanning several lines."""
    frame = pd.read_json(project / "raw" / "train.jsonl", lines=True)
    return frame[["question", "answer"]].to_csv(index=False)


def _read(project: Path, text: str) -> pd.DataFrame:
    path = project / "raw" / "pool.csv"
    path.write_text(text)
    return read_source(str(path), "train", None, project)


def _line_of(text: str, marker: str) -> int:
    return text[: text.index(marker)].count("\n") + 1


def test_a_record_with_extra_fields_is_named_by_its_file_lines(project: Path, good_csv: str):
    records = good_csv.split('"\n')  # records end with a quoted answer
    bad = 'ragged,"spans\nthree\nlines",extra\n'
    text = '"\n'.join(records[:8]) + '"\n' + bad + '"\n'.join(records[8:])
    first = _line_of(text, "ragged,")
    assert first > 30  # pandas would say "line 10": its count of records
    with pytest.raises(IngestError) as raised:
        _read(project, text)
    assert str(raised.value).endswith(
        f"pool.csv: lines {first}-{first + 2}: 3 fields where the header has 2 (a ',' inside "
        "a field needs the field in double quotes)"
    )


def test_an_extra_field_in_the_first_row_is_an_error_not_a_silent_shift(project: Path):
    """pandas takes a first row with one field more as an index column and shifts every
    value one column left: question would hold the answers."""
    with pytest.raises(IngestError, match=r"pool\.csv: line 2: 3 fields where the header has 2"):
        _read(project, "question,answer\nq1,a1,x\nq2,a2,y\n")


def test_an_unclosed_quote_names_the_line_it_opens(project: Path, good_csv: str):
    text = good_csv + 'last,"never closed\nand more\n'
    line = _line_of(text, "last,")
    with pytest.raises(IngestError, match=rf"pool\.csv: line {line}: a quoted field opens here"):
        _read(project, text)


@pytest.mark.parametrize(("delimiter", "named"), [(";", "';'"), ("\t", "tab")])
def test_a_file_separated_by_another_delimiter_says_so(project: Path, delimiter, named):
    rows = [f"q{i}{delimiter}a{i}" for i in range(6)] + [f"What is 1,000?{delimiter}a"]
    text = "\n".join([f"question{delimiter}answer", *rows]) + "\n"
    with pytest.raises(IngestError) as raised:
        _read(project, text)
    assert str(raised.value).endswith(
        f"pool.csv: line 1: the header is one column {f'question{delimiter}answer'!r}, so the "
        f"configured columns are missing; the file looks {named}-separated, but Sift reads "
        "comma-separated CSV: save it with ',' between columns (or as JSONL)"
    )


def test_a_column_named_twice_is_refused(project: Path):
    with pytest.raises(IngestError, match=r"pool\.csv: line 1: column 'answer' appears twice"):
        _read(project, "question,answer,answer\nq,a,b\n")


def test_rows_keep_their_file_lines_around_blank_and_whitespace_lines(project: Path):
    from steps.data.ingest import IngestConfig, ingest

    (project / "raw" / "pool.csv").write_text(
        'question,answer\nq1,a1\n   \nq2,a2\n\nq3,"multi\nline"\n'
    )
    config = IngestConfig(source="raw/pool.csv", eval_source="raw/test.jsonl")
    staged = ingest(config, project, project / "staging")
    places = pd.read_parquet(staged.train.staged.places_path).place.tolist()
    assert places == ["raw/pool.csv line 2", "raw/pool.csv line 4", "raw/pool.csv line 6"]
