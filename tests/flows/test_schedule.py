"""`sift serve` on a real Prefect server: the cron schedule creates runs and a run completes.

This is what broke with SQLAlchemy 2.1 / new fastapi (docs/stack-notes.md): deployments were
saved but the scheduler never created runs. Runs in subprocesses so the server's settings
do not mix with the test session's Prefect harness.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import MODEL_DIR

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _post(api: str, path: str, body: dict) -> list | dict:
    return httpx.post(f"{api}{path}", json=body, timeout=10).json()


def test_served_cron_schedule_creates_and_runs_flows(project: Path, tmp_path: Path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    # Its own MLflow store, created here: two scheduled runs starting together on a store
    # that still needs its tables would both migrate it ("table secrets already exists").
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    prefect = str(Path(sys.executable).parent / "prefect")
    sift = str(Path(sys.executable).parent / "sift")
    logs = (tmp_path / "server.log").open("w"), (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=logs[0],
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stop it and everything it starts, together
    )
    served = None
    try:
        _wait(lambda: _health(api), 90, "the Prefect server")
        served = subprocess.Popen(
            [
                sift,
                "serve",
                "--cron",
                "* * * * *",
                "--name",
                "sift-cron-test",
                "--project-dir",
                str(project),
                "--set",
                f"data.source={project / 'raw' / 'train.jsonl'}",
                "--set",
                f"data.eval_source={project / 'raw' / 'test.jsonl'}",
                "--set",
                f"model.name={MODEL_DIR}",
                "--set",
                "finetune.epochs=1",
                "--set",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "--set",
                f"version.remote_url={tmp_path / 'remote'}",
            ],
            env=env,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
            cwd=project,
            start_new_session=True,  # its flow runs are child processes: stop them too
        )
        deployment = _wait(lambda: _post(api, "/deployments/filter", {}), 60, "the deployment")[0]
        assert deployment["name"] == "sift-cron-test"
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
        # The scheduler service fills the schedule with future runs.
        _wait(
            lambda: [r for r in _post(api, "/flow_runs/filter", {}) if r["auto_scheduled"]],
            60,
            "the scheduler to create scheduled runs",
        )
        # Whichever run comes first (the cron tick or this manual one), one must complete.
        _post(api, f"/deployments/{deployment['id']}/create_flow_run", {})
        done = _wait(
            lambda: [
                r
                for r in _post(api, "/flow_runs/filter", {})
                if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
            ],
            240,
            "a served run to finish",
        )
        assert done[0]["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for process in (served, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _health(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
