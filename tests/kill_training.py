"""Kill a real training process mid-run, for the resume tests (tests/model/test_finetune.py,
tests/unit/test_equal_steps.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from steps.training.finetune import last_checkpoint


def kill_at_first_checkpoint(
    worker: subprocess.Popen, checkpoints: Path, timeout: float = 60
) -> Path:
    """SIGKILL `worker` once it has written a checkpoint under `checkpoints`; return the newest
    complete checkpoint left behind (the one a re-run resumes from)."""
    deadline = time.monotonic() + timeout
    while last_checkpoint(checkpoints) is None and worker.poll() is None:
        assert time.monotonic() < deadline, f"no checkpoint within {timeout:g} s"
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed = last_checkpoint(checkpoints)
    assert killed is not None
    return killed
