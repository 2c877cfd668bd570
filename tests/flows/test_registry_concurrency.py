"""The champion gate under concurrency, and registry outages, against real servers.

Two real pipeline runs (separate processes, tests/flows/pipeline_driver.py) start together
against one `mlflow server` — SQLite-backed with the ephemeral Prefect API the two share, and
PostgreSQL-backed with a Prefect server — or in one project on its own SQLite store, and
differ only in learning rate, so their eval losses differ and both first versions compete
for `champion`. A third test holds the
registry lock itself and shows a run's gate waits for it; a fourth stops the MLflow server
right after a version is created and shows nothing half-registered is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.registry_lock import registry_lock, registry_lock_name
from steps.hashing import file_md5
from steps.registry.aliases import history
from steps.registry.register import CHALLENGER, CHAMPION, WEIGHTS_TAG
from tests.conftest import REPO, small_run_overrides, write_jsonl
from tests.flows.registry_servers import (
    NO_HTTP_RETRIES,
    OutageProxy,
    clean_env,
    mlflow_client,
    mlflow_server,
    postgres_database,
    prefect_server,
)

pytestmark = pytest.mark.slow
DRIVER = REPO / "tests" / "flows" / "pipeline_driver.py"
MODEL = "sift-concurrent"
# Two learning rates a decade apart: after one epoch on 8 examples their eval losses differ.
LEARNING_RATES = ("2e-3", "2e-4")
LINEAGE_TAGS = ("git.sha", "dvc.md5", "dvc.train_md5", "mlflow.source_run", WEIGHTS_TAG)


def _project(root: Path, train: list[dict], test: list[dict]) -> Path:
    """A user's project (a git repo with raw data); each run gets its own, so the two runs
    share only what is under test: the registry and the Prefect API."""
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    write_jsonl(root / "raw" / "train.jsonl", train)
    write_jsonl(root / "raw" / "test.jsonl", test)
    return root


@dataclass(frozen=True)
class Run:
    process: subprocess.Popen
    log_path: Path  # the run's stderr: a file, not a pipe, which would block it when full


def _start(project: Path, tracking_uri: str, env: dict[str, str], *extra: str) -> Run:
    overrides = [
        *small_run_overrides(
            project,
            remote=project / "dvc-remote",
            model_name=MODEL,
            tracking_uri=tracking_uri,
            budget="8",
        ),
        *extra,
    ]
    log_path = project / f"driver-{len(list(project.glob('driver-*.log')))}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(DRIVER), str(project), *overrides],
            env={**env, "PYTHONPATH": str(REPO)},
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    return Run(process, log_path)


def _wait(run: Run, timeout: float = 900) -> tuple[int, str, str]:
    """The run's exit code, stdout and stderr; killed if it outlives timeout."""
    try:
        stdout, _ = run.process.communicate(timeout=timeout)
    finally:
        _kill(run)
    return run.process.returncode, stdout, run.log_path.read_text()


def _kill(run: Run) -> None:
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def _finish(run: Run) -> dict:
    returncode, stdout, log = _wait(run)
    assert returncode == 0, log[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _two_runs_at_once(
    tmp_path: Path, tracking_uri: str, env: dict[str, str], data, one_project: bool = False
) -> list[dict]:
    """Two runs started together, in a project each or both in one; returns their results."""
    train, test = data
    if one_project:
        projects = [_project(tmp_path / "run-0", train, test)] * 2
    else:
        projects = [_project(tmp_path / f"run-{i}", train, test) for i in range(2)]
    runs = [  # started together: both reach the gate with no champion yet
        _start(project, tracking_uri, env, f"finetune.learning_rate={rate}")
        for project, rate in zip(projects, LEARNING_RATES, strict=True)
    ]
    try:
        results = [_finish(run) for run in runs]
    finally:
        for run in runs:
            _kill(run)
    assert results[0]["eval_loss"] != results[1]["eval_loss"]

    client = mlflow_client(tracking_uri)
    registered = client.search_model_versions(f"name='{MODEL}'")
    versions = {v.tags["mlflow.source_run"]: v for v in registered}
    assert set(versions) == {r["run_id"] for r in results}, "a run's version is missing"
    best = min(results, key=lambda r: r["eval_loss"])
    champion = client.get_model_version_by_alias(MODEL, CHAMPION)
    assert champion.tags["mlflow.source_run"] == best["run_id"], (results, champion.tags)

    # Both decisions recorded: the first version to pass the gate took champion (no
    # champion yet); the second was compared with it and moved champion or was kept out.
    decisions = [e for e in history(client, MODEL) if e.alias == CHAMPION]
    assert [e.kind for e in decisions] == ["auto", "auto"], decisions
    assert {e.to_version for e in decisions} == {str(v.version) for v in versions.values()}
    first, second = decisions
    assert first.moved and first.from_version is None
    assert second.from_version == first.to_version
    assert second.moved == (second.to_version == str(champion.version))
    return results


def test_two_runs_at_once_on_sqlite_mlflow_and_the_ephemeral_prefect_api_leave_the_better_champion(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    # The ephemeral API of each process serves one shared Prefect database (PREFECT_HOME),
    # as two `sift run` of one project share .sift/prefect.
    env = clean_env() | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow") as server:
        _two_runs_at_once(tmp_path, server.url, env, (gsm8k_train[:40], gsm8k_test[:8]))


def test_two_runs_at_once_on_postgresql_mlflow_and_a_prefect_server_leave_the_better_champion(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    with (
        postgres_database() as database_uri,
        prefect_server(tmp_path / "prefect-server") as api_url,
        mlflow_server(database_uri, tmp_path / "mlflow") as server,
    ):
        env = clean_env() | {"PREFECT_API_URL": api_url}
        _two_runs_at_once(tmp_path, server.url, env, (gsm8k_train[:40], gsm8k_test[:8]))
        limit = _read_limit(api_url, registry_lock_name(MODEL))
        assert (limit.limit, limit.active_slots) == (1, 0)  # the gates' one slot, released


def test_two_runs_at_once_in_one_new_project_both_finish_and_version_one_data(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    """Two `sift run`s started together in one project with nothing in it yet: one failed in
    validation on the shared Great Expectations store, and two first runs at once both
    created the MLflow store. Each now validates in a folder of its own, the store is created
    once, and data/ and data.dvc are versioned (and pushed) by one run at a time."""
    project = tmp_path / "run-0"
    store = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"  # the default place, not there yet
    data = (gsm8k_train[:40], gsm8k_test[:8])
    results = _two_runs_at_once(tmp_path, store, clean_env(), data, one_project=True)

    dir_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    client = mlflow_client(store)
    assert {client.get_run(r["run_id"]).data.tags["dvc.md5"] for r in results} == {dir_md5}
    assert (project / "dvc-remote" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).is_file()
    manifest = json.loads((project / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] /
                           dir_md5[2:]).read_text())  # fmt: skip
    assert {e["relpath"]: e["md5"] for e in manifest} == {
        p.name: file_md5(p) for p in (project / "data").iterdir()
    }
    (validated,) = (project / ".sift" / "validated").iterdir()  # no run's scratch folder left
    assert "." not in validated.name
    assert not [p.name for p in project.iterdir() if p.name.startswith(".data")]


def _read_limit(api_url: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_a_run_registers_but_moves_no_alias_to_champion_while_another_holds_the_registry_lock(
    prefect_harness, tmp_path: Path, gsm8k_train, gsm8k_test
):
    from prefect.settings import PREFECT_API_URL

    env = clean_env() | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}  # the harness's API
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow") as server:
        client = mlflow_client(server.url)
        with registry_lock(MODEL, wait_seconds=30):
            run = _start(project, server.url, env)
            try:
                aliases = _aliases_once_registered(client, run.process)
                assert CHALLENGER in aliases
                # Unlocked, the gate would move champion within a second of challenger.
                time.sleep(10)
                assert run.process.poll() is None, "the run finished while the lock was held"
                assert CHAMPION not in _aliases(client)
            except BaseException:
                _kill(run)
                raise
        _finish(run)
        assert _aliases(client) == {CHALLENGER: "1", CHAMPION: "1"}


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}


def _aliases_once_registered(client: MlflowClient, process: subprocess.Popen) -> dict[str, str]:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if client.search_registered_models(f"name='{MODEL}'") and _aliases(client):
            return _aliases(client)
        time.sleep(1)
    raise AssertionError(f"no alias set before the run ended ({process.poll()})")


def test_an_outage_right_after_a_version_is_created_leaves_no_half_version_and_a_rerun_completes(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    env = clean_env() | NO_HTTP_RETRIES
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow") as server:
        # The server stops right after it created the version, before the client hears back:
        # whatever the client meant to do next (tags, aliases) never reaches the registry.
        proxy = OutageProxy(
            server.url,
            trip=lambda method, path: method == "POST" and "/model-versions/create" in path,
            on_trip=server.stop,
        )
        with proxy.running():
            returncode, _, log = _wait(_start(project, proxy.url, env))
            assert proxy.tripped.is_set(), "the run never reached model-version creation"
            assert returncode != 0, "the run succeeded although the registry went down"
            assert "MlflowException" in log or "ConnectionError" in log, log[-4000:]

            server.start()
            proxy.target = server.url
            client = mlflow_client(server.url)
            for version in client.search_model_versions(f"name='{MODEL}'"):
                missing = [tag for tag in LINEAGE_TAGS if tag not in version.tags]
                assert not missing, f"version {version.version} is half-registered: {missing}"
            assert not client.get_registered_model(MODEL).aliases

            rerun = _finish(_start(project, proxy.url, env))
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert [str(v.version) for v in versions] == ["1"], "the re-run registered a duplicate"
        assert all(tag in versions[0].tags for tag in LINEAGE_TAGS)
        assert _aliases(client) == {CHALLENGER: "1", CHAMPION: "1"}
        assert client.get_run(rerun["run_id"]).info.status == "FINISHED"


def test_a_registry_outage_of_a_few_seconds_is_survived_by_the_task_retries(
    tmp_path: Path, gsm8k_train, gsm8k_test
):
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    env = clean_env() | NO_HTTP_RETRIES  # no client-side retries: the task's own must do it
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow") as server:

        def restart() -> None:  # down at once, back on a new port a few seconds later
            server.stop()
            time.sleep(3)
            server.start()
            proxy.target = server.url

        proxy = OutageProxy(
            server.url,
            trip=lambda method, path: method == "POST" and "/model-versions/create" in path,
            on_trip=lambda: threading.Thread(target=restart, daemon=True).start(),
        )
        with proxy.running():
            result = _finish(_start(project, proxy.url, env))
            assert proxy.tripped.is_set() and server.starts == 2
            client = mlflow_client(server.url)
            versions = client.search_model_versions(f"name='{MODEL}'")
            assert [str(v.version) for v in versions] == ["1"], "the retry registered a duplicate"
            assert all(tag in versions[0].tags for tag in LINEAGE_TAGS)
            assert _aliases(client) == {CHALLENGER: "1", CHAMPION: "1"}
            assert client.get_run(result["run_id"]).info.status == "FINISHED"
