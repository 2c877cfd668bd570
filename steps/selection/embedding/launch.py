"""Multi-process embedding, the worker side: what `accelerate launch` runs in each process.

    python -m steps.selection.embedding.launch SPEC.json LAUNCH_DIR

SPEC.json is an EmbedJob (embed.py), validated here. Worker r of N computes
chunks[r::N] on its own GPU (or the CPU) and writes its WorkerReport to LAUNCH_DIR; the parent
(multiprocess.py) waits for all of them, then merges the chunks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from torch.distributed.elastic.multiprocessing.errors import record

from steps.selection.embedding.embed import EmbedJob, embed_shard
from steps.selection.embedding.multiprocess import WorkerReport, write_report


@record  # the launcher's failure summary, the end of workers.log, then quotes the traceback
def main(argv: list[str]) -> int:
    """Runs one worker; returns its exit status."""
    job = EmbedJob.model_validate_json(Path(argv[0]).read_text())
    # Sets up torch.distributed from the launcher's environment (NCCL with a GPU per process;
    # gloo on CPU, which accelerate picks only when told cpu=True) and this worker's device.
    state = PartialState(cpu=job.device == "cpu")
    chunks = job.chunks[state.process_index :: state.num_processes]
    print(
        f"embed worker {state.process_index}/{state.num_processes} ({state.backend}, "
        f"{state.device}): chunks {chunks}",
        flush=True,
    )
    # a worker beyond the number of chunks loads no model
    tokens, seconds = embed_shard(job, chunks, str(state.device)) if chunks else (0, 0.0)
    write_report(Path(argv[1]), state.process_index, WorkerReport(tokens, seconds))
    state.wait_for_everyone()  # every report written before any worker leaves the group
    state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
