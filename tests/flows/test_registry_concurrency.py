"""The champion gate under concurrency, and registry outages, against real servers.

Two real pipeline runs (separate processes, tests/flows/pipeline_driver.py) start together
against one `mlflow server` — SQLite-backed with the ephemeral Prefect API the two share, and
PostgreSQL-backed with a Prefect server — or in one project on its own SQLite store, and
differ only in learning rate, so their eval losses differ and both first versions compete
for `champion`. A third test holds the
registry lock itself and shows a run's gate waits for it; a fourth takes the registry down
right after a version is created and shows nothing half-registered is left behind; a fifth
shows the task retries survive an outage of a few seconds at that point.

The SQLite-backed `mlflow server` is started once for the module (`sqlite_server`): each test
registers a model name of its own on it, so what one test asserts about its model's versions,
aliases and history cannot be met or spoilt by another's. The outages are the relay's
(`OutageProxy.down`): the client sees what it saw when the server itself was stopped, a 503
for every request, without the seconds a server restart costs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
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
    MlflowServer,
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
# How long the retry test's registry stays down: the register task's first retry comes 5 s
# after its failure (flows/tasks.py REMOTE_RETRIES), so the outage must outlast the failed
# attempt's remaining requests and is still there for some of them.
OUTAGE_S = 3.0
# A run meeting an outage that lasts: the default waits (5 + 15 + 30 s) would only idle.
SHORT_RETRIES = "tracking.remote_retry_delays=[1, 1, 1]"
# How long the lock test holds the lock once the run's promote task runs: an unlocked gate
# moves champion within a second of that (a read, a compare, an alias write).
HELD_AFTER_PROMOTE_STARTS_S = 5.0


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One SQLite-backed `mlflow server` for the module's tests (a model name each)."""
    root = tmp_path_factory.mktemp("sqlite-mlflow")
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "mlflow") as server:
        yield server


def _harness_env() -> dict[str, str]:
    """A run's environment pointed at the session's Prefect harness: no ephemeral API to
    start (and migrate) per run, where the Prefect API is not what the test is about."""
    from prefect.settings import PREFECT_API_URL

    return clean_env() | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


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


def _start(
    project: Path, tracking_uri: str, env: dict[str, str], *extra: str, model: str = MODEL
) -> Run:
    overrides = [
        *small_run_overrides(
            project,
            remote=project / "dvc-remote",
            model_name=model,
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
    tmp_path: Path,
    tracking_uri: str,
    env: dict[str, str],
    data,
    one_project: bool = False,
    model: str = MODEL,
) -> list[dict]:
    """Two runs started together, in a project each or both in one; returns their results."""
    train, test = data
    if one_project:
        projects = [_project(tmp_path / "run-0", train, test)] * 2
    else:
        projects = [_project(tmp_path / f"run-{i}", train, test) for i in range(2)]
    runs = [  # started together: both reach the gate with no champion yet
        _start(project, tracking_uri, env, f"finetune.learning_rate={rate}", model=model)
        for project, rate in zip(projects, LEARNING_RATES, strict=True)
    ]
    try:
        results = [_finish(run) for run in runs]
    finally:
        for run in runs:
            _kill(run)
    assert results[0]["eval_loss"] != results[1]["eval_loss"]

    client = mlflow_client(tracking_uri)
    registered = client.search_model_versions(f"name='{model}'")
    versions = {v.tags["mlflow.source_run"]: v for v in registered}
    assert set(versions) == {r["run_id"] for r in results}, "a run's version is missing"
    best = min(results, key=lambda r: r["eval_loss"])
    champion = client.get_model_version_by_alias(model, CHAMPION)
    assert champion.tags["mlflow.source_run"] == best["run_id"], (results, champion.tags)

    # Both decisions recorded: the first version to pass the gate took champion (no
    # champion yet); the second was compared with it and moved champion or was kept out.
    decisions = [e for e in history(client, model) if e.alias == CHAMPION]
    assert [e.kind for e in decisions] == ["auto", "auto"], decisions
    assert {e.to_version for e in decisions} == {str(v.version) for v in versions.values()}
    first, second = decisions
    assert first.moved and first.from_version is None
    assert second.from_version == first.to_version
    assert second.moved == (second.to_version == str(champion.version))
    return results


def test_two_runs_at_once_on_sqlite_mlflow_and_the_ephemeral_prefect_api_leave_the_better_champion(
    sqlite_server: MlflowServer, tmp_path: Path, gsm8k_train, gsm8k_test
):
    """Both versions registered, the better one champion, both gate decisions recorded in
    order (the second compared with the first): a gate without the lock lets both read "no
    champion" and record two first decisions."""
    # The ephemeral API of each process serves one shared Prefect database (PREFECT_HOME),
    # as two `sift run` of one project share .sift/prefect.
    env = clean_env() | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    data = (gsm8k_train[:40], gsm8k_test[:8])
    _two_runs_at_once(tmp_path, sqlite_server.url, env, data, model="sift-concurrent-sqlite")


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
    prefect_harness, sqlite_server: MlflowServer, tmp_path: Path, gsm8k_train, gsm8k_test
):
    """While the test holds the model's registry lock, the run registers its version (as
    challenger) and its promote task starts, yet champion does not move and the run does not
    end; once the lock is released the run finishes with version 1 champion. A gate that
    ignores the lock moves champion within a second of its promote task starting."""
    model = "sift-concurrent-locked"
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    client = mlflow_client(sqlite_server.url)
    with registry_lock(model, wait_seconds=30):
        started = datetime.now(UTC)
        run = _start(project, sqlite_server.url, _harness_env(), model=model)
        try:
            aliases = _aliases_once_registered(client, run.process, model)
            assert CHALLENGER in aliases
            _wait_for_running_task("promote", started, run.process)  # the gate is at the lock
            time.sleep(HELD_AFTER_PROMOTE_STARTS_S)
            assert run.process.poll() is None, "the run finished while the lock was held"
            assert CHAMPION not in _aliases(client, model)
        except BaseException:
            _kill(run)
            raise
    _finish(run)
    assert _aliases(client, model) == {CHALLENGER: "1", CHAMPION: "1"}


def _aliases(client: MlflowClient, model: str = MODEL) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(model).aliases.items()}


def _aliases_once_registered(
    client: MlflowClient, process: subprocess.Popen, model: str
) -> dict[str, str]:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if client.search_registered_models(f"name='{model}'") and _aliases(client, model):
            return _aliases(client, model)
        time.sleep(0.5)
    raise AssertionError(f"no alias set before the run ended ({process.poll()})")


def _wait_for_running_task(name: str, since: datetime, process: subprocess.Popen) -> None:
    """Until a task run called name-…, started after `since`, is RUNNING on the session's
    Prefect harness (the test's run is the only one on it now)."""
    from prefect.settings import PREFECT_API_URL

    query = {"task_runs": {"name": {"like_": f"{name}-"},
                           "start_time": {"after_": since.isoformat()},
                           "state": {"type": {"any_": ["RUNNING"]}}}}  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", json=query, timeout=10)
        found.raise_for_status()  # a filter the API rejects must not read as "found"
        if found.json():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {name} task running before the run ended ({process.poll()})")


def _creates_a_version(method: str, path: str) -> bool:
    return method == "POST" and "/model-versions/create" in path


def test_an_outage_right_after_a_version_is_created_leaves_no_half_version_and_a_rerun_completes(
    prefect_harness, sqlite_server: MlflowServer, tmp_path: Path, gsm8k_train, gsm8k_test
):
    """The registry goes down (for good) right after it created the run's version: the run
    fails, the version carries every lineage tag (they are set in the one create request, not
    after it) and no alias; a re-run with the registry back finishes, finds that version by
    its weights instead of registering a duplicate, and makes it challenger and champion."""
    model = "sift-outage-half"
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    env = _harness_env() | NO_HTTP_RETRIES
    # Down right after the server created the version, before the client hears back:
    # whatever the client meant to do next (tags, aliases) never reaches the registry.
    proxy = OutageProxy(sqlite_server.url, trip=_creates_a_version,
                        on_trip=lambda: proxy.down.set())  # fmt: skip
    with proxy.running():
        # The registry stays down, so every retry fails too: short waits, the same outcome.
        failing = _start(project, proxy.url, env, SHORT_RETRIES, model=model)
        returncode, _, log = _wait(failing)
        assert proxy.tripped.is_set(), "the run never reached model-version creation"
        assert proxy.refused, "no request of the run met the outage"
        assert returncode != 0, "the run succeeded although the registry went down"
        assert "MlflowException" in log or "ConnectionError" in log, log[-4000:]

        proxy.down.clear()  # the registry is back
        client = mlflow_client(sqlite_server.url)
        for version in client.search_model_versions(f"name='{model}'"):
            missing = [tag for tag in LINEAGE_TAGS if tag not in version.tags]
            assert not missing, f"version {version.version} is half-registered: {missing}"
        assert not client.get_registered_model(model).aliases

        rerun = _finish(_start(project, proxy.url, env, model=model))
    versions = client.search_model_versions(f"name='{model}'")
    assert [str(v.version) for v in versions] == ["1"], "the re-run registered a duplicate"
    assert all(tag in versions[0].tags for tag in LINEAGE_TAGS)
    assert _aliases(client, model) == {CHALLENGER: "1", CHAMPION: "1"}
    assert client.get_run(rerun["run_id"]).info.status == "FINISHED"


def test_a_registry_outage_of_a_few_seconds_is_survived_by_the_task_retries(
    prefect_harness, sqlite_server: MlflowServer, tmp_path: Path, gsm8k_train, gsm8k_test
):
    """The registry goes down for OUTAGE_S right after it created the run's version, and
    requests of the run meet it (503, no client-side retries): the register task's own
    retry finishes the run, with that one version (found by its weights, no duplicate)
    carrying every lineage tag, challenger and champion. Without task retries the run fails."""
    model = "sift-outage-retry"
    project = _project(tmp_path / "run", gsm8k_train[:40], gsm8k_test[:8])
    env = _harness_env() | NO_HTTP_RETRIES  # no client-side retries: the task's own must do it

    def outage() -> None:  # down at once, back a few seconds later
        proxy.down.set()
        threading.Timer(OUTAGE_S, proxy.down.clear).start()

    proxy = OutageProxy(sqlite_server.url, trip=_creates_a_version, on_trip=outage)
    with proxy.running():
        result = _finish(_start(project, proxy.url, env, model=model))
    assert proxy.tripped.is_set(), "the run never reached model-version creation"
    assert proxy.refused, "no request of the run met the outage"
    client = mlflow_client(sqlite_server.url)
    versions = client.search_model_versions(f"name='{model}'")
    assert [str(v.version) for v in versions] == ["1"], "the retry registered a duplicate"
    assert all(tag in versions[0].tags for tag in LINEAGE_TAGS)
    assert _aliases(client, model) == {CHALLENGER: "1", CHAMPION: "1"}
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
