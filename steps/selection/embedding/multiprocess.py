"""Multi-process embedding, the parent side: `accelerate launch` N workers and wait.

embed_pool (embed.py) writes the chunk folder's manifest and an EmbedJob naming
the chunks still missing, then calls run_workers; each worker (launch.py)
computes every N-th of them and reports its tokens and seconds in RANK_REPORT; embed_pool then
merges all chunks in pool order, as after a one-process pass. The launcher is fine-tuning's
(steps/processes.py: torch.distributed under accelerate, NCCL on GPUs, gloo on CPU), shared
outside both stages so that the embedding cache key (the code of embed.py and of what it
imports, steps.hashing.code_fingerprint) does not follow the training code.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steps.processes import accelerate_launch, die_with_parent

REPO_DIR = Path(__file__).resolve().parents[3]
WORKER_MODULE = "steps.selection.embedding.launch"
RANK_REPORT = "rank-{rank}.json"  # in the launch folder, one per worker that finished


@dataclass(frozen=True)
class WorkerReport:
    """What one worker computed: real tokens of the chunks it wrote, seconds of its loop."""

    tokens: int
    seconds: float


def write_report(launch_dir: Path, rank: int, report: WorkerReport) -> None:
    """Write-then-rename, so the parent never reads half a report."""
    path = launch_dir / RANK_REPORT.format(rank=rank)
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(asdict(report)))
    partial.replace(path)


def launch_command(spec_path: Path, launch_dir: Path, num_processes: int) -> list[str]:
    """`accelerate launch` of the workers on this machine: the pass runs its own autocast
    (steps.hardware.autocast), not accelerate's."""
    return accelerate_launch(num_processes, "no", WORKER_MODULE, [spec_path, launch_dir])


def run_workers(
    spec_json: str, num_processes: int, device: str, out_dir: Path
) -> list[WorkerReport]:
    """Runs the EmbedJob `spec_json` in num_processes workers; returns their reports.

    The launch folder is out_dir/launch (spec.json, workers.log, one report per rank). Raises
    ValueError when there are fewer GPUs than processes, RuntimeError with the log's last lines
    when a worker fails.
    """
    if device == "cuda" and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"embed.num_processes={num_processes} needs one GPU per process; "
            f"{torch.cuda.device_count()} visible"
        )
    launch_dir = out_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    for stale in launch_dir.glob(RANK_REPORT.format(rank="*")):
        stale.unlink()  # a report of an earlier launch must not answer for this one
    spec_path, log_path = launch_dir / "spec.json", launch_dir / "workers.log"
    spec_path.write_text(spec_json)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH")) if p
        ),
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the resolved device is CPU: keep workers off GPUs
    command = launch_command(spec_path, launch_dir, num_processes)
    with log_path.open("w") as log_file:
        code = subprocess.call(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    paths = [launch_dir / RANK_REPORT.format(rank=rank) for rank in range(num_processes)]
    if code != 0 or not all(path.is_file() for path in paths):
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"embed.num_processes={num_processes}: the workers exited with code {code} "
            f"(log: {log_path}). Last lines:\n{tail}"
        )
    return [WorkerReport(**json.loads(path.read_text())) for path in paths]
