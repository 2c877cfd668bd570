"""Batch: a source's rows, a batch at a time, each naming its place; a text file's raw lines."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from steps.data.local_files import UNREADABLE, LocalFile, open_file

__all__ = ["BATCH_ROWS", "BOM", "Batch", "raw_lines"]

# Rows per batch: ~5 MB of GSM8K-sized text; memory stays flat whatever the file size.
BATCH_ROWS = 10_000
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Batch:
    frame: pd.DataFrame
    where: list[str]  # per row: "line N" (JSONL, text, CSV) or "record N" (1-based)


def raw_lines(file: LocalFile) -> Iterator[tuple[int, bytes]]:
    """Every line with its 1-based number, decompressed, the BOM dropped; a file that cannot
    be read or decompressed is an IngestError naming the line where reading stopped."""
    number = 0
    try:
        with open_file(file) as handle:
            for number, raw in enumerate(handle, start=1):
                yield number, raw.removeprefix(BOM) if number == 1 else raw
    except UNREADABLE as error:
        raise file.unreadable(error, f"line {number + 1}") from None
