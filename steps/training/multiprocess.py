"""Multi-process fine-tuning, the parent side: `accelerate launch` N workers and wait.

The parent writes the TrainJob as JSON, launches the workers (torch.distributed under
accelerate: NCCL on GPUs, gloo on CPU), waits, and reads the result file back: rank 0's
ModelRef, or the WorkerFailure of a rank that stopped on a non-finite loss. Each worker is
steps/training/launch.py; Trainer handles DDP/FSDP from the environment the launcher sets
(RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow

from steps.processes import accelerate_launch, die_with_parent
from steps.training.callbacks import NonFiniteLossError
from steps.training.job import (
    NON_FINITE_LOSS_EXIT,
    ModelRef,
    TrainJob,
    WorkerFailure,
    read_result,
)

REPO_DIR = Path(__file__).resolve().parents[2]
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
WORKER_MODULE = "steps.training.launch"


def launch_command(
    spec_path: Path,
    result_path: Path,
    num_processes: int,
    precision: str,
    accelerate_config: str | None,
) -> list[str]:
    """The `accelerate launch` command line for this machine (or a cluster's config file)."""
    return accelerate_launch(
        num_processes,
        ACCELERATE_PRECISION[precision],
        WORKER_MODULE,
        [spec_path, result_path],
        accelerate_config,
    )


def run_workers(job: TrainJob, work_dir: Path) -> ModelRef:
    """Runs the job in finetune.num_processes workers and returns rank 0's ModelRef.

    Raises NonFiniteLossError when a worker reports one (result file or exit status), and
    RuntimeError with the log's last lines for any other failure.
    """
    num_processes = job.finetune.num_processes
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (
        work_dir / "spec.json",
        work_dir / "result.json",
        work_dir / "workers.log",
    )
    result_path.unlink(missing_ok=True)  # a result from an earlier attempt must not answer
    spec_path.write_text(job.model_dump_json())
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH")) if p
        ),
    }
    if job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the resolved device is CPU: keep workers off GPUs
    command = launch_command(
        spec_path, result_path, num_processes, job.precision, job.finetune.accelerate_config
    )
    with log_path.open("w") as log_file:
        code = subprocess.call(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    result = read_result(result_path)
    if isinstance(result, WorkerFailure) or code == NON_FINITE_LOSS_EXIT:
        message = result.message if isinstance(result, WorkerFailure) else "see the log"
        raise NonFiniteLossError(f"a fine-tune worker stopped: {message} (log: {log_path})")
    if code != 0 or result is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"finetune.num_processes={num_processes}: the workers exited with code {code} "
            f"(log: {log_path}). Last lines:\n{tail}"
        )
    return result
