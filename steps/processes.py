"""Child processes the steps start: `accelerate launch` command lines and orphan protection.

Fine-tuning (steps/training/multiprocess.py) and embedding
(steps/selection/embedding/multiprocess.py) launch their workers the same way; the served
model (steps/registry/serve.py) is a child too.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path


def accelerate_launch(
    num_processes: int,
    mixed_precision: str,
    module: str,
    args: list[Path],
    config_file: str | None = None,
) -> list[str]:
    """`accelerate launch -m module *args` on this machine, or per a cluster's config file."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        command += ["--config_file", config_file, "--num_processes", str(num_processes)]
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
            mixed_precision,
            "--dynamo_backend",
            "no",
        ]
    return [*command, "-m", module, *(str(arg) for arg in args)]


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when its parent dies (even by SIGKILL), so a killed
    sift leaves no orphan workers writing next to a re-run, nor a server holding its port
    (prctl PR_SET_PDEATHSIG = 1). A no-op off Linux."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
