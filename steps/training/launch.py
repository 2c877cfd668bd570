"""Multi-process fine-tuning, the worker side: what `accelerate launch` runs in each process.

    python -m steps.training.launch SPEC.json [RESULT.json]

SPEC.json is a TrainJob (steps/training/job.py), validated here. Rank 0 writes its ModelRef to
RESULT.json; a rank that stops on a non-finite loss writes a WorkerFailure there and exits with
NON_FINITE_LOSS_EXIT, so the parent (steps/training/multiprocess.py) tells a divergence from a
crash without reading the log.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from steps.training.callbacks import NonFiniteLossError
from steps.training.finetune import train
from steps.training.job import NON_FINITE_LOSS_EXIT, TrainJob, WorkerFailure, write_result


def main(argv: list[str]) -> int:
    """Runs one worker; returns its exit status."""
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    result_path = Path(argv[1]) if len(argv) > 1 else None
    try:
        ref = train(job)
    except NonFiniteLossError as error:
        traceback.print_exc()  # the log keeps the whole story; the parent reads the file
        if result_path is not None:
            write_result(result_path, WorkerFailure(error="non_finite_loss", message=str(error)))
        return NON_FINITE_LOSS_EXIT
    if result_path is not None and int(os.environ.get("RANK", "0")) == 0:
        write_result(result_path, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
