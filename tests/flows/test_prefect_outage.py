"""A Prefect server down for a few seconds in the middle of a run: the run survives it (the
client's and the tasks' retries) and ends Completed on the server, with one model version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, small_run_overrides, write_jsonl
from tests.flows.registry_servers import (
    BIN,
    _stop,
    _wait_until_up,
    clean_env,
    free_port,
    mlflow_client,
)

pytestmark = pytest.mark.slow
DRIVER = REPO / "tests" / "flows" / "pipeline_driver.py"


def _start_server(home: Path, port: int, attempt: int) -> subprocess.Popen:
    env = clean_env() | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    log = home / f"server-{attempt}.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    _wait_until_up(f"http://127.0.0.1:{port}/api/health", process, log, timeout=180)
    return process


# Tasks that run for seconds on the small slice (finetune alone can take 2 s: a poll on a
# busy box may miss it), so the outage lands mid-run.
LONG_TASKS = ("embed", "finetune", "evaluate")


def _running_task(api: str) -> bool:
    try:
        runs = httpx.post(f"{api}/task_runs/filter", json={}, timeout=5).json()
    except httpx.HTTPError:
        return False
    return any(r["name"].startswith(LONG_TASKS) and r["state_type"] == "RUNNING" for r in runs)


def test_a_prefect_server_restart_mid_run_is_survived(tmp_path: Path, gsm8k_train, gsm8k_test):
    """The server stopped while a long task runs and restarted on its port and database 5 s
    later: the run exits 0, its one flow run is COMPLETED on the server, its MLflow run
    FINISHED, one model version. A run that gave up on the API would exit non-zero or leave
    its flow run in another state."""
    project = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[:40])
    write_jsonl(project / "raw" / "test.jsonl", gsm8k_test[:8])
    home, port = tmp_path / "prefect-home", free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client(store).search_experiments()  # the store's tables exist before the run
    overrides = small_run_overrides(project, remote=tmp_path / "remote", model_name="sift-outage",
                                    tracking_uri=store, budget="8")  # fmt: skip
    server = _start_server(home, port, 1)
    log_path = tmp_path / "driver.log"
    driver = None
    try:
        with log_path.open("w") as log:
            driver = subprocess.Popen(
                [sys.executable, str(DRIVER), str(project), *overrides],
                env=clean_env() | {"PREFECT_API_URL": api, "PYTHONPATH": str(REPO)},
                cwd=project, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 600
        while not _running_task(api):
            assert driver.poll() is None, "the run ended before any long task was seen running"
            assert time.monotonic() < deadline, "the run never reached embed/finetune/evaluate"
            time.sleep(0.5)
        _stop(server)  # down while the run works, reports states and writes results
        time.sleep(5)
        server = _start_server(home, port, 2)  # the same port and database
        stdout, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, log_path.read_text()[-4000:]
        # Read on the restarted server, still up (no third start just to read it).
        result = json.loads(stdout.strip().splitlines()[-1])
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"], runs
        client = mlflow_client(store)
        assert client.get_run(result["run_id"]).info.status == "FINISHED"
        versions = client.search_model_versions("name='sift-outage'")
        assert [str(v.version) for v in versions] == ["1"]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        _stop(server)
