"""`sift serve` on a real Prefect server: the cron schedule is registered and fills with
runs; a first run trains, a second on the same data stops as "no new data" in seconds.

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

from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR

pytestmark = pytest.mark.slow


CRON = "0 3 * * 1"  # Mondays 03:00: the scheduler books future runs; the test triggers its own


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
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# What Prefect's own client retries (prefect/client/base.py): a server busy with its SQLite
# database answers 503 for a moment; a test calling the API directly must do the same.
RETRIED_STATUSES = (429, 502, 503)


def _post(api: str, path: str, body: dict) -> list | dict:
    """The API's answer; an error status fails with what the server said (after Prefect's
    client retries, which a raw request does not get)."""
    answer = httpx.post(f"{api}{path}", json=body, timeout=10)
    for wait_s in (1, 2, 4, 8):
        if answer.status_code not in RETRIED_STATUSES:
            break
        time.sleep(wait_s)
        answer = httpx.post(f"{api}{path}", json=body, timeout=10)
    assert answer.is_success, f"POST {path}: {answer.status_code} {answer.text[:2000]}"
    return answer.json()


def test_served_schedule_trains_once_then_stops_on_unchanged_data(project: Path, tmp_path: Path):
    """The served deployment carries the cron schedule, the scheduler books runs of it, a
    triggered run trains and a second one on the same data ends "No new data" in under half
    the first's time, running none of embed, finetune or register."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        # The API is what the test reads: no UI build to copy into a fresh PREFECT_HOME.
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's own poll intervals, shortened: the runner looks for runs to start every
        # 10 s by default (each triggered run waited up to that long to start), the scheduler
        # for new deployments every 5 s. What runs, and when it ends, is the same.
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
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
                CRON,
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
                ALLOW_REPO_ASSETS,
                "--set",
                "finetune.epochs=1",
                "--set",
                "eval.suite=none",  # the held-out loss only: benchmarks have their own tests
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
        assert deployment["schedules"][0]["schedule"]["cron"] == CRON
        # The scheduler service fills the schedule with future runs.
        _wait(
            lambda: [r for r in _post(api, "/flow_runs/filter", {}) if r["auto_scheduled"]],
            60,
            "the scheduler to create scheduled runs",
        )
        first = _run_now(api, deployment["id"], 300)
        assert first["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert "No new data" not in _summary(api, first["id"])
        second = _run_now(api, deployment["id"], 120)
        assert second["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert "No new data" in _summary(api, second["id"])
        assert second["total_run_time"] < first["total_run_time"] / 2, (first, second)
        tasks = {r["name"].rsplit("-", 1)[0] for r in _post(
            api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [second["id"]]}}}
        )}  # fmt: skip
        assert not {"embed", "finetune", "register"} & tasks, tasks
    finally:
        for process in (served, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _run_now(api: str, deployment_id: str, timeout: float) -> dict:
    """Triggers a run of the deployment and waits for it to end."""
    run = _post(api, f"/deployments/{deployment_id}/create_flow_run", {})
    query = {"flow_runs": {"id": {"any_": [run["id"]]}}}
    ended = ("COMPLETED", "FAILED", "CRASHED")

    def finished() -> dict | None:
        runs = _post(api, "/flow_runs/filter", query)
        return next((r for r in runs if r["state_type"] in ended), None)

    return _wait(
        finished,
        timeout,
        f"flow run {run['id']} to finish",
    )  # fmt: skip


def _summary(api: str, flow_run_id: str) -> str:
    """The run's end-of-run markdown artifact (what a person reads in the UI)."""
    query = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    artifacts = _post(api, "/artifacts/filter", query)
    return next((str(a["data"]) for a in artifacts if a["key"] == "sift-run-summary"), "")


def _health(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
