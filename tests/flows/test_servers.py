"""`sift server up|status|down` on real servers: what `up` starts answers, later commands in the
project use it, INFO lines of a flow reach the Prefect API, `down` stops exactly what `up`
started, and bad settings stop `up` before anything starts.

The shared servers come from the `sift` executable in a subprocess, as in a shell: they
outlive the command that started them. The other tests run the CLI in-process (typer's
CliRunner, as tests/flows/test_cli.py does), which saves the ~10 s `import flows.cli.main` costs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner, Result

from flows import servers
from flows.cli.main import app
from flows.runtime import process_status, servers_dir, servers_state_path
from tests.conftest import REPO
from tests.flows.registry_servers import POSTGRES, clean_env, free_port, postgres_database

SIFT = Path(sys.executable).parent / "sift"
runner = CliRunner()


def sift_server(verb: str, project: Path, *overrides: str) -> Result:
    args = ["server", verb, "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    return runner.invoke(app, args)


def sift_server_up_process(project: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`sift server up` as a user runs it: its own process, cwd the project."""
    command = [str(SIFT), "server", "up", "--project-dir", str(project)]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, cwd=project, env=clean_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def recorded(project: Path) -> dict:
    return json.loads(servers_state_path(project).read_text())["servers"]


def run_python(project: Path, script: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the project (no Prefect/MLflow settings from this session)."""
    return subprocess.run([sys.executable, "-c", script, str(project)], cwd=project,
                          env=clean_env(), capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One `sift server up` (SQLite, free ports) shared by the read-only checks below."""
    project = tmp_path_factory.mktemp("served")
    started = sift_server_up_process(project)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield project, started.stdout
    finally:
        servers.down(project)


@pytest.mark.slow
def test_up_prints_both_ui_urls_and_status_reports_both_healthy(running):
    project, output = running
    entries = recorded(project)
    assert f"Prefect UI  {entries['prefect']['url']}" in output
    assert f"MLflow UI   {entries['mlflow']['url']}" in output
    result = sift_server("status", project)
    assert result.exit_code == 0, result.output
    for name in ("prefect", "mlflow"):
        assert f"{name:<8} healthy      {entries[name]['url']}" in result.output


@pytest.mark.slow
def test_prefect_ui_settings_name_the_api_of_the_started_server(running):
    project, _ = running
    prefect = recorded(project)["prefect"]
    settings = httpx.get(f"{prefect['url']}/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect["client_url"] == f"{prefect['url']}/api"


TRACKING_SCRIPT = """
import os, sys
from pathlib import Path
from flows.runtime import configure_environment
project = Path(sys.argv[1])
configure_environment(project)
from mlflow.tracking import MlflowClient
from steps.tracking import TrackingConfig, resolve_tracking_uri
uri = resolve_tracking_uri(TrackingConfig(), project)  # what `sift run` logs to
MlflowClient(uri).create_experiment("reached-through-state")
print(os.environ["PREFECT_API_URL"], uri)
"""


@pytest.mark.slow
def test_commands_in_the_project_use_the_recorded_servers(running):
    project, _ = running
    entries = recorded(project)
    done = run_python(project, TRACKING_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [entries["prefect"]["client_url"], entries["mlflow"]["url"]]
    assert MlflowClient(entries["mlflow"]["url"]).get_experiment_by_name("reached-through-state")


FLOW_SCRIPT = """
import sys
from pathlib import Path
from flows.runtime import configure_environment
configure_environment(Path(sys.argv[1]))
from prefect import flow
from prefect.runtime import flow_run

@flow(name="log-check", log_prints=True)
def log_check() -> str:
    print("LINE-FROM-A-PRINT")
    return str(flow_run.get_id())

print(log_check())
"""


@pytest.mark.slow
def test_a_flow_print_reaches_the_prefect_api_as_an_info_log_and_not_the_console(running):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    project, _ = running
    done = run_python(project, FLOW_SCRIPT)
    assert done.returncode == 0, done.stderr
    flow_run_id = uuid.UUID(done.stdout.strip().splitlines()[-1])
    assert "LINE-FROM-A-PRINT" not in done.stderr  # the console handler stays at WARNING
    api = recorded(project)["prefect"]["client_url"]
    with SyncPrefectClient(api) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert ("LINE-FROM-A-PRINT", 20) in [(log.message, log.level) for log in logs]


# infra/README.md's commands for the two pools, and prefect.yaml deployed as it is.
DEPLOY_COMMANDS = """
prefect work-pool create sift-process --type process
prefect work-pool create sift-gpu --type kubernetes \\
  --base-job-template infra/k8s/base-job-template.json
prefect --no-prompt deploy --all
"""


@pytest.mark.slow
def test_prefect_yaml_deploys_both_nightly_deployments_on_the_started_server(running):
    project, _ = running
    api = recorded(project)["prefect"]["client_url"]
    env = clean_env() | {"PREFECT_API_URL": api, "PREFECT_HOME": str(project / ".sift" / "prefect"),
                         "PATH": f"{SIFT.parent}:{os.environ['PATH']}",
                         "SIFT_IMAGE": "registry.example.com/sift:0.1.0"}  # fmt: skip
    done = subprocess.run(["bash", "-ec", DEPLOY_COMMANDS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    deployments = {d["name"]: d for d in found}
    assert {n: d["work_pool_name"] for n, d in deployments.items()} == {
        "sift-nightly": "sift-process", "sift-nightly-k8s": "sift-gpu"}  # fmt: skip
    for deployment in deployments.values():
        assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert deployment["parameters"]["config"]["schedule"] == {"skip_unchanged": True}
    assert deployments["sift-nightly-k8s"]["job_variables"] == {
        "image": "registry.example.com/sift:0.1.0", "gpu_count": 1}  # fmt: skip
    pool = httpx.get(f"{api}/work_pools/sift-gpu", timeout=10).json()
    template = json.loads((REPO / "infra" / "k8s" / "base-job-template.json").read_text())
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == template


@pytest.mark.slow
def test_down_stops_both_process_groups_even_a_killed_leaders_and_then_is_a_no_op(tmp_path):
    ports = {"prefect": free_port(), "mlflow": free_port()}
    overrides = [f"server.{name}_port={port}" for name, port in ports.items()]
    started = sift_server("up", tmp_path, *overrides)
    try:
        assert started.exit_code == 0, started.output
        entries = recorded(tmp_path)
        assert [entries[name]["url"] for name in ports] == [
            f"http://127.0.0.1:{port}" for port in ports.values()
        ]
        pids = [entries[name]["pid"] for name in ports]
        # kill -9 of MLflow's leader leaves its uvicorn worker serving: status says it is
        # down, and down must stop the worker too.
        os.kill(pids[1], signal.SIGKILL)
        assert servers.group_members(pids[1])
        status = sift_server("status", tmp_path)
        assert status.exit_code == 1 and f"mlflow   not running  {entries['mlflow']['url']}" in (
            status.output
        )
        stopped = sift_server("down", tmp_path)
    finally:
        servers.down(tmp_path)
    assert stopped.exit_code == 0, stopped.output
    for name, pid in zip(ports, pids, strict=True):
        assert f"{name} server (pid {pid}) stopped" in stopped.output
        # Started in-process, they stay zombies of pytest until reaped: gone all the same.
        assert process_status(pid) is None and not servers.group_members(pid)
    assert not servers_state_path(tmp_path).exists()
    again = sift_server("down", tmp_path)
    assert again.exit_code == 0 and "nothing to stop" in again.output
    assert sift_server("status", tmp_path).exit_code == 3


def _nothing_started(project: Path) -> bool:
    """No record, pid file or log: `up` refused before starting a server."""
    folder = servers_dir(project)
    return not folder.exists() or not any(folder.iterdir())


def test_a_configured_port_in_use_stops_up_naming_the_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = sift_server("up", tmp_path, f"server.mlflow_port={port}")
    assert result.exit_code == 1
    assert f"server.mlflow_port={port}: port {port} on 127.0.0.1 is already in use" in (
        result.output
    )
    assert _nothing_started(tmp_path)


def test_an_unreachable_database_stops_up_naming_the_url_without_its_password(tmp_path):
    url = f"postgresql://sift:hunter2@127.0.0.1:{free_port()}/sift"
    result = sift_server("up", tmp_path, f"server.database_url={url}")
    assert result.exit_code == 1
    assert "server.database_url: cannot connect to PostgreSQL at " in result.output
    assert url.replace("hunter2", "***") in result.output and "hunter2" not in result.output
    assert _nothing_started(tmp_path)


def test_a_bad_setting_exits_2_naming_the_key(tmp_path):
    result = sift_server("up", tmp_path, "server.database_url=mysql://db/sift")
    assert result.exit_code == 2 and "server.database_url" in result.output
    result = sift_server("up", tmp_path, "server.prefect_prot=4200")
    assert result.exit_code == 2 and "server.prefect_prot" in result.output
    assert _nothing_started(tmp_path)


def test_a_config_files_server_section_is_read_and_checked(tmp_path):
    config = tmp_path / "servers.yaml"
    config.write_text("# sift server up --config servers.yaml\nserver:\n  mlflow_port: 70000\n")
    result = runner.invoke(app, ["server", "up", "--config", str(config),
                                 "--project-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
    assert f"invalid server config in {config}" in result.output
    assert "server.mlflow_port" in result.output
    assert _nothing_started(tmp_path)


def _processes_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds `entry` (e.g. this project's PREFECT_HOME)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(environ.parent.name)
        if entry.encode() in values and process_status(pid) is not None:
            found.append(pid)
    return found


@pytest.mark.slow
def test_a_server_exiting_during_start_up_shows_its_log_and_stops_the_other(tmp_path):
    # A Prefect database that is not one: its migrations fail and the server exits (~10 s).
    (tmp_path / ".sift" / "prefect").mkdir(parents=True)
    (tmp_path / ".sift" / "prefect" / "prefect.db").write_text("not a database " * 10)
    result = sift_server("up", tmp_path)
    assert result.exit_code == 1
    assert "the prefect server exited during start-up (code 3)" in result.output
    assert f"{servers_dir(tmp_path) / 'prefect.log'} ends:" in result.output
    assert "file is not a database" in result.output  # the log's tail
    assert not servers_state_path(tmp_path).exists()
    mlflow_store = f"MLFLOW_BACKEND_STORE_URI=sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert not _processes_with_env(mlflow_store)


STALE_SCRIPT = """
import os, sys
from pathlib import Path
from flows.runtime import configure_environment
configure_environment(Path(sys.argv[1]))
configure_environment(Path(sys.argv[1]))
print(os.environ.get("PREFECT_API_URL"), os.environ.get("MLFLOW_TRACKING_URI"))
"""


def test_a_stale_record_is_ignored_with_one_note(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    entry = {"pid": gone.pid, "start_ticks": 1, "program": "prefect", "url": "http://x",
             "client_url": "http://127.0.0.1:9/api", "health_url": "http://x"}  # fmt: skip
    servers_dir(tmp_path).mkdir(parents=True)
    state = {"ready": True, "servers": {"prefect": entry, "mlflow": entry | {"program": "mlflow"}}}
    servers_state_path(tmp_path).write_text(json.dumps(state))
    done = run_python(tmp_path, STALE_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"]
    assert done.stderr.count(f"ignoring {servers_state_path(tmp_path)}") == 1
    assert f"the prefect server recorded there (pid {gone.pid}) is not running" in done.stderr


@contextmanager
def dropped_afterwards(names: list[str]) -> Iterator[None]:
    import psycopg2
    from psycopg2 import sql

    try:
        yield
    finally:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
        admin.autocommit = True
        with admin.cursor() as cursor:
            for name in names:
                drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                cursor.execute(drop.format(sql.Identifier(name)))
        admin.close()


def _rows(database: str, query: str) -> list[tuple]:
    import psycopg2

    connection = psycopg2.connect(dbname=database, connect_timeout=5, **POSTGRES)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()
    finally:
        connection.close()  # before the database is dropped


@pytest.mark.slow
@pytest.mark.services
def test_up_on_postgresql_keeps_both_stores_there(tmp_path):
    with postgres_database() as url:
        base = url.rsplit("/", 1)[1]
        names = [f"{base}_prefect", f"{base}_mlflow"]
        with dropped_afterwards(names):
            result = sift_server("up", tmp_path, f"server.database_url={url}")
            try:
                assert result.exit_code == 0, result.output
                assert sift_server("status", tmp_path).exit_code == 0
                mlflow_url = recorded(tmp_path)["mlflow"]["url"]
                MlflowClient(mlflow_url).create_experiment("kept-in-postgres")
            finally:
                servers.down(tmp_path)
            experiments = _rows(names[1], "SELECT name FROM experiments")
            prefect_tables = _rows(names[0], "SELECT 1 FROM pg_tables WHERE tablename='flow_run'")
    assert ("kept-in-postgres",) in experiments
    assert prefect_tables == [(1,)]


@pytest.mark.slow
def test_sift_deploy_puts_the_checked_config_on_a_prefect_yaml_deployment(running):
    """A bad key exits 2 naming it (checked before anything reaches Prefect); a good config
    lands, checked and with the scheduled defaults, as the deployment's parameters."""
    project, _ = running
    api = recorded(project)["prefect"]["client_url"]
    env = clean_env() | {"PREFECT_API_URL": api, "PREFECT_HOME": str(project / ".sift" / "prefect")}
    # The pool the deployment names, through the API (the `prefect` CLI's start-up costs
    # seconds); 409: the infra/README test made it already.
    pool = httpx.post(f"{api}/work_pools/", json={"name": "sift-process", "type": "process"},
                      timeout=30)  # fmt: skip
    assert pool.status_code in (201, 409), pool.text
    # In-process: the config is checked before the command reads the environment or
    # starts `prefect deploy`, so the answer is the executable's.
    bad = runner.invoke(app, ["deploy", "--project-dir", str(REPO), "--set", "select.budgt=1"])
    assert bad.exit_code == 2 and "select.budgt" in bad.output
    done = subprocess.run(
        [str(SIFT), "deploy", "--project-dir", str(REPO), "--name", "sift-nightly",
         "--cron", "0 4 * * *", "--set", "select.budget=0.2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    deployment = next(d for d in found if d["name"] == "sift-nightly")
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 4 * * *"
    config = deployment["parameters"]["config"]
    assert config["select"]["budget"] == 0.2 and config["select"]["prior"] == "champion"
    assert config["schedule"]["skip_unchanged"] is True
    assert config["model"]["name"] == "assets/models/stories260K"  # relative: the worker's checkout
