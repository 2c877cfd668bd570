"""Large files are streamed: ingest's peak memory does not grow with the file.

Each measurement ingests in a fresh interpreter and reads its peak RSS (getrusage); the
baseline process ingests a tiny file, so the difference is what the data costs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_jsonl
from tests.data.ingest_rss import GSM8K_TRAIN, measure, write_jsonl

SEED = read_jsonl(GSM8K_TRAIN, 500)


def _measure(tmp_path: Path, megabytes: float) -> tuple[dict, int]:
    source = tmp_path / f"pool-{megabytes:g}mb.jsonl"
    rows = write_jsonl(source, megabytes, SEED)
    result = measure(source, tmp_path / f"work-{megabytes:g}")
    source.unlink()
    return result, rows


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_file_size(tmp_path: Path):
    """Flat, not merely small: 275 MiB more data may cost 20 MiB more peak at most. Memory
    that grew with the data at 0.07 MiB per MiB (what the former 1 GiB check, < 150 MiB over
    the baseline, allowed) fails here too, in a third of the bytes; so does per-row state
    such as a set of row ids (~100 bytes a row: +50 MiB over these 500 K rows). Measured on
    2 shared cores: 25 and 300 MiB within ±7 MiB of each other, ~+80 MiB over the baseline."""
    baseline, _ = _measure(tmp_path, 0.05)
    small, _ = _measure(tmp_path, 25)
    large, rows = _measure(tmp_path, 300)
    assert large["rows"] == rows > 500_000
    growth = large["peak_rss_mb"] - baseline["peak_rss_mb"]
    # Read whole, 300 MiB of JSON is >800 MiB of Python objects; streamed, a few batches.
    assert growth < 120, (baseline, small, large)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 20, (small, large)
    print(json.dumps({"baseline": baseline, "25MiB": small, "300MiB": large}))


def test_a_malformed_line_deep_in_a_large_file_is_named(tmp_path: Path):
    source = tmp_path / "pool.jsonl"
    rows = write_jsonl(source, 8, SEED)
    with source.open("a") as handle:
        handle.write('{"question": "q", "answer": "a"\n')
    from steps.data.ingest import IngestConfig, IngestError, ingest

    config = IngestConfig(source=str(source), eval_source=str(source), eval_limit=5)
    with pytest.raises(IngestError, match=rf"pool\.jsonl: line {rows + 1} is not valid JSON"):
        ingest(config, tmp_path, tmp_path / "staging")
    assert not (tmp_path / "staging" / "train.parquet").exists()
