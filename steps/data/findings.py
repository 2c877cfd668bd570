"""What validation found: failed or flagged expectations summed over chunks, the rows they
quote, and their messages naming each row by its source file and line (ingest's places)."""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from steps.data.checks import FLAG, QUOTE_FROM, REASON
from steps.data.ingest import TableRef

QUOTE_LEAD = 20  # characters quoted before a hidden or control character deep in a text


@dataclass
class Failure:
    """One failed expectation of one split, summed over chunks."""

    count: int = 0
    rows: list[int] = field(default_factory=list)
    values: list[object] = field(default_factory=list)
    observed: object = None
    indexed: bool = True  # names offending rows (so quarantine can drop them)


# A failed expectation: split, GX type, column, description (two regex checks on one column
# differ only in the last).
FailureKey = tuple[str, str, str | None, str | None]
Places = dict[str, dict[int, str]]  # split → 0-based row → "raw/train.jsonl line 8"


@dataclass
class Findings:
    failures: dict[FailureKey, Failure] = field(default_factory=dict)
    reasons: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # split → row → why
    flags: dict[FailureKey, Failure] = field(default_factory=dict)  # severity FLAG: rows kept

    def add(self, split: str, outcomes: list, examples: int) -> None:
        for outcome in outcomes:
            if outcome.success:
                continue
            config, details = outcome.expectation_config, outcome.result or {}
            key = (split, config.type, config.kwargs.get("column"), config.description)
            flag = config.severity == FLAG
            found = (self.flags if flag else self.failures).setdefault(key, Failure())
            rows = [int(row) for row in details.get("unexpected_index_list") or []]
            found.count += details.get("unexpected_count") or 0
            room = max(examples - len(found.rows), 0)
            found.rows += rows[:room]
            values = (details.get("partial_unexpected_list") or [])[:room]
            quote_from = (config.meta or {}).get(QUOTE_FROM)
            found.values += [quote_near(value, quote_from) for value in values]
            if details.get("observed_value") is not None:
                found.observed = details["observed_value"]
            found.indexed = found.indexed and bool(rows)
            # A reason of its own (conversation checks): it, and what the row holds.
            reason, held = (config.meta or {}).get(REASON), details.get("unexpected_list") or []
            for index, row in enumerate([] if flag else rows):
                why = config.type if reason is None else f"{reason} ({held[index]})"
                self.reasons.setdefault(split, {}).setdefault(row, []).append(why)

    def rows(self) -> dict[str, set[int]]:
        """The rows that messages quote, per split."""
        quoted: dict[str, set[int]] = {}
        for (split, *_), found in [*self.failures.items(), *self.flags.items()]:
            quoted.setdefault(split, set()).update(found.rows)
        return quoted

    def flag_lines(self, examples: int, places: Places) -> tuple[str, ...]:
        return tuple(
            describe(key, found, examples, places.get(key[0], {}))
            for key, found in self.flags.items()
        )

    def lines(self, examples: int, places: Places, unfixable_only: bool = False) -> list[str]:
        return [
            describe(key, found, examples, places.get(key[0], {}))
            for key, found in self.failures.items()
            if not (unfixable_only and found.indexed)
        ]


def quote_near(value: object, pattern: str | None) -> object:
    """The value from a little before pattern's first match: messages quote the first 60
    characters, and a hidden character deep in a long text must show in them."""
    if pattern is None or not isinstance(value, str):
        return value
    found = re.search(pattern, value)
    if found is None or found.start() < QUOTE_LEAD + 10:
        return value
    return "…" + value[found.start() - QUOTE_LEAD :]


def describe(key: FailureKey, found: Failure, examples: int, places: dict[int, str]) -> str:
    split, kind, column, description = key
    where = f" on column '{column}'" if column else ""
    counted = f" ({found.count} rows)" if found.count else ""
    what = f" - {description}" if description else ""
    if found.rows:
        evidence = "; " + ", ".join(
            f"{place_of(row, places)} ({value!r:.60})"
            for row, value in zip(found.rows[:examples], found.values, strict=False)
        )
    elif found.observed is not None:
        evidence = f"; observed {found.observed!r:.200}"
    else:
        evidence = ""
    return f"[{split}] {kind}{where}{counted}{what}{evidence}"


def place_of(row: int, places: dict[int, str]) -> str:
    # A table that ingest did not stage (no places) is named by its own row numbers.
    return places.get(row) or f"staged row {row} (0-based)"


def read_places(tables: dict[str, TableRef], wanted: dict[str, set[int]]) -> Places:
    """The source places of the wanted rows, in one streaming pass per places table."""
    places: Places = {}
    for split, table in tables.items():
        rows = wanted.get(split, set())
        places[split] = {}
        if table.staged is None or not rows:
            continue
        ordered, offset = sorted(rows), 0  # each batch takes its slice: no rescan per batch
        batches = pq.ParquetFile(table.staged.places_path).iter_batches(columns=["place"])
        for batch in batches:
            column = batch.column(0)
            start, end = bisect_left(ordered, offset), bisect_left(ordered, offset + len(column))
            for row in ordered[start:end]:
                places[split][row] = column[row - offset].as_py()
            offset += len(column)
    return places
