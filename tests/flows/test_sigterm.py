"""SIGTERM stops a real `sift run` (a process of its own) wherever it lands: at the flow's
start, where one SIGTERM in two was lost in a finaliser and the run carried on, and in
training. The command exits 143 with one line, its MLflow run is KILLED, no model version is
registered, and data.dvc names data the DVC remote holds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.cli.main import sigterm_line
from steps.training.finetune import CHECKPOINTS, last_checkpoint
from tests.conftest import REPO, small_run_overrides, write_jsonl
from tests.flows.registry_servers import clean_env, mlflow_client

pytestmark = pytest.mark.slow
EXIT_BOUND_S = 60  # from SIGTERM to exit: the flow's teardown and the Prefect API's stop


def _run(project: Path, store: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    overrides = small_run_overrides(
        project, remote=project / "dvc-remote", model_name="sift-sigterm", tracking_uri=store
    )
    args = [arg for item in [*overrides, *extra] for arg in ("--set", item)]
    log_path = project / f"run-{len(list(project.glob('run-*.log')))}.log"
    env = clean_env() | {
        "PYTHONPATH": str(REPO),
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",  # the flow's start shows in the log
    }
    with log_path.open("w") as log:
        command = [sys.executable, "-m", "flows.cli", "run", "--project-dir", str(project)]
        process = subprocess.Popen(
            [*command, *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    return process, log_path


def _terminate_when(process: subprocess.Popen, ready: Callable[[], bool]) -> float:
    """SIGTERM once `ready()`; the seconds the process took to exit after it."""
    deadline = time.monotonic() + 600
    while not ready():
        assert process.poll() is None, "the run ended before the signal"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running {EXIT_BOUND_S} s after SIGTERM") from None
    return time.monotonic() - sent


def _checkpointed(project: Path) -> bool:
    return any(last_checkpoint(p) for p in project.glob(f".sift/models/*/{CHECKPOINTS}"))


def test_sigterm_at_the_flow_start_and_in_training_stops_the_run_and_registers_nothing(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    project = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[:40])
    write_jsonl(project / "raw" / "test.jsonl", gsm8k_test[:8])
    store = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    stages = {
        "flow start": ((), lambda log: "Beginning flow run" in log.read_text()),
        "training": (
            ("finetune.epochs=40", "finetune.checkpoint_steps=1"),  # one step an epoch
            lambda log: _checkpointed(project),
        ),
    }
    for stage, (extra, ready) in stages.items():
        process, log = _run(project, store, *extra)
        _terminate_when(process, lambda log=log, ready=ready: ready(log))
        output = log.read_text()
        assert process.returncode == 128 + signal.SIGTERM, (stage, output[-3000:])
        assert sigterm_line("sift run") in output.splitlines(), (stage, output[-3000:])  # one line
        assert "Traceback" not in output, (stage, output[-3000:])

    client = mlflow_client(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {run.info.status for run in runs} == {"KILLED"}  # training's, at least
    assert client.search_registered_models() == []
    dir_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert (project / "dvc-remote" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).is_file()
