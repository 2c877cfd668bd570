"""Peak memory of ingesting a large JSONL file (a benchmark and a test helper).

    .venv/bin/python -m tests.data.ingest_rss --megabytes 1024

writes a JSONL file of that size (GSM8K rows, made distinct), ingests it in a fresh
process and prints rows, seconds and that process's peak RSS, next to a baseline process
that ingests a tiny file (imports and interpreter alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = REPO / "assets" / "data" / "gsm8k" / "train.jsonl"
CHILD = """
import json, resource, sys, time
from pathlib import Path
from steps.data.ingest import IngestConfig, ingest
source, project, out = sys.argv[1:4]
start = time.perf_counter()
config = IngestConfig(source=source, eval_source=source, eval_limit=10, allowed_roots=("/",))
result = ingest(config, Path(project), Path(out))
print(json.dumps({
    "rows": result.train.rows,
    "seconds": round(time.perf_counter() - start, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}))
"""


def write_jsonl(path: Path, megabytes: float, seed_rows: list[dict]) -> int:
    """Cycles seed rows (numbered, so every row is distinct) until the file reaches the size."""
    target, written, rows = int(megabytes * 2**20), 0, 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            block = "".join(
                json.dumps({"question": f"{r['question']} (#{rows + i})", "answer": r["answer"]})
                + "\n"
                for i, r in enumerate(seed_rows)
            )
            handle.write(block)
            written += len(block.encode())
            rows += len(seed_rows)
    return rows


def measure(source: Path, work_dir: Path) -> dict:
    """Ingests `source` in a fresh interpreter and returns its rows, seconds and peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(work_dir), str(work_dir / "staging")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1024)
    args = parser.parse_args()
    seed = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[:1000]]
    with tempfile.TemporaryDirectory(prefix="sift-rss-") as tmp:
        work = Path(tmp)
        small, big = work / "small.jsonl", work / "big.jsonl"
        write_jsonl(small, 0.01, seed[:10])
        rows = write_jsonl(big, args.megabytes, seed)
        size = big.stat().st_size / 2**20
        baseline = measure(small, work / "a")
        result = measure(big, work / "b")
        print(f"file: {size:,.0f} MiB, {rows:,} rows")
        print(f"baseline (tiny file): peak RSS {baseline['peak_rss_mb']:,.0f} MiB")
        print(
            f"big file: peak RSS {result['peak_rss_mb']:,.0f} MiB "
            f"(+{result['peak_rss_mb'] - baseline['peak_rss_mb']:,.0f} MiB over baseline), "
            f"{result['seconds']} s, {result['rows']:,} rows"
        )


if __name__ == "__main__":
    main()
