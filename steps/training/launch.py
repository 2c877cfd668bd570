"""Multi-process fine-tuning: `accelerate launch` of this module, one worker per process.

The parent writes the fine-tune call as JSON, launches the workers (torch.distributed
under accelerate: NCCL on GPUs, gloo on CPU), waits, and reads back the result that rank 0
wrote. Every worker runs steps.training.finetune.train; Trainer handles DDP/FSDP from the
environment the launcher sets (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    python -m steps.training.launch SPEC.json     # one worker; what accelerate launch runs N times
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from steps.training.callbacks import NonFiniteLossError

REPO_DIR = Path(__file__).resolve().parents[2]
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launch_command(
    spec_path: Path, num_processes: int, device: str, precision: str, accelerate_config: str | None
) -> list[str]:
    """The `accelerate launch` command line for this machine (or a cluster's config file)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", accelerate_config, "--num_processes", str(num_processes)]
    else:
        # --multi_gpu selects accelerate's torch.distributed launcher; on a CPU-only machine
        # the workers fall back to gloo (accelerate's --cpu flag would start one process).
        command += [
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            ACCELERATE_PRECISION[precision],
            "--dynamo_backend",
            "no",
        ]
    return [*command, "-m", "steps.training.launch", str(spec_path)]


def _die_with_parent() -> None:
    """If the parent is killed (even SIGKILL), the launcher gets SIGTERM and stops its workers,
    so a re-run never shares the checkpoint folder with orphans (Linux prctl)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_workers(
    spec: dict[str, Any],
    work_dir: Path,
    num_processes: int,
    device: str,
    accelerate_config: str | None,
) -> dict[str, Any]:
    """Runs the fine-tune in num_processes workers and returns rank 0's ModelRef fields."""
    import mlflow

    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (
        work_dir / "spec.json",
        work_dir / "result.json",
        work_dir / "workers.log",
    )
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH")) if p
        ),
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the resolved device is CPU: keep workers off GPUs
    command = launch_command(spec_path, num_processes, device, spec["precision"], accelerate_config)
    with log_path.open("w") as log_file:
        code = subprocess.call(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    if "NonFiniteLossError" in tail:
        raise NonFiniteLossError(f"a fine-tune worker stopped on a non-finite loss:\n{tail}")
    if code != 0 or not result_path.is_file():
        raise RuntimeError(
            f"finetune.num_processes={num_processes}: the workers exited with code {code} "
            f"(log: {log_path}). Last lines:\n{tail}"
        )
    return json.loads(result_path.read_text())


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    from steps.training.finetune import train_from_spec  # here, not at the top: finetune imports us

    ref = train_from_spec(spec)
    if int(os.environ.get("RANK", "0")) == 0 and spec.get("result_path"):
        Path(spec["result_path"]).write_text(json.dumps(asdict(ref)))


if __name__ == "__main__":
    main(sys.argv[1:])
