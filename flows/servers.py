"""`sift server up|down|status`: a Prefect server and an MLflow tracking server on this machine.

Both bind 127.0.0.1, each in its own process group (stopped as a group, so uvicorn's workers
die with it), with a pid file, a log and one state.json under `.sift/servers/`;
`flows.runtime.configure_environment` points later `sift` commands at them while they run.

Stores: SQLite by default (Prefect: `.sift/prefect/prefect.db`, the ephemeral API's database
every `sift run` already wrote to; MLflow: `mlflow/mlflow.db`, the project's store), so runs
from before `up` show in both UIs. `server.database_url=postgresql://USER@HOST:PORT/NAME` puts
them in PostgreSQL databases NAME_prefect and NAME_mlflow, created when missing. Artifacts:
`mlflow/artifacts`, or `server.artifacts_uri=s3://BUCKET/PREFIX` (credentials from the
environment only: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import URL, make_url

from flows.runtime import (
    process_matches,
    process_status,
    read_servers_state,
    servers_dir,
    servers_state_path,
    stale_reason,
    state_dir,
)
from steps import config_files

HOST = "127.0.0.1"  # never the network: put a reverse proxy with auth in front to share
BIN = Path(sys.executable).parent  # the prefect and mlflow of this environment
STOP_GRACE_S = 20.0  # SIGTERM → SIGKILL; both servers stopped in 1–3 s when measured
LOG_TAIL_CHARS = 3000


class ServerError(ValueError):
    pass


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefect_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prefect server; 0: a free one picked at `up` (a configured port "
        "in use is an error).",
    )
    mlflow_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the MLflow server; 0: a free one picked at `up`.",
    )
    database_url: str | None = Field(
        default=None,
        description="null: SQLite; postgresql://USER@HOST:PORT/NAME: databases NAME_prefect and "
        "NAME_mlflow (PGPASSWORD keeps a password out of files).",
    )
    artifacts_uri: str | None = Field(
        default=None,
        description="MLflow artifact store; null: <project>/mlflow/artifacts; s3://BUCKET/PREFIX "
        "or an absolute path for a shared one.",
    )
    # Each server answered its health check after 3–11 s here; a loaded 2-core box is slower.
    start_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds `up` waits for each server's health check before failing.",
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"expected postgresql://USER@HOST:PORT/NAME, got {value!r}")
        if value is not None and not make_url(value).database:
            raise ValueError(f"{redact(value)} names no database (…/NAME)")
        return value

    @field_validator("artifacts_uri")
    @classmethod
    def _artifact_store(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("s3://", "file:///", "/")):
            raise ValueError(f"expected s3://BUCKET/PREFIX or an absolute path, got {value!r}")
        return value


class ServerFile(BaseModel):
    """A `sift server --config` file: one `server:` section (the pipeline's config has none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerConfig = Field(
        default_factory=ServerConfig,
        description="The Prefect and MLflow servers `sift server up` starts on 127.0.0.1.",
    )


def load_server_config(path: Path | None, overrides: list[str]) -> ServerConfig:
    """Defaults, then the file's `server:` section, then --set server.KEY=VALUE."""
    try:
        parsed = [config_files.parse_override(item) for item in overrides]
    except ValueError as error:
        raise ServerError(str(error)) from None
    return config_files.load_model(ServerFile, path, parsed, ServerError, "server config").server


def redact(url: str) -> str:
    """The URL as safe to print or record: its password, if any, as ***."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class Stores:
    prefect_db_url: str  # PREFECT_SERVER_DATABASE_CONNECTION_URL
    mlflow_store_uri: str  # MLFLOW_BACKEND_STORE_URI
    artifacts_uri: str  # --artifacts-destination
    described: str  # for people: where both live, without passwords


def resolve_stores(config: ServerConfig, project_dir: Path) -> Stores:
    """The stores `up` uses, created where missing (folders; PostgreSQL databases)."""
    artifacts = config.artifacts_uri or (project_dir / "mlflow" / "artifacts").as_uri()
    if artifacts.startswith("/"):
        artifacts = Path(artifacts).as_uri()
    if artifacts.startswith("file://"):
        Path(artifacts.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    if config.database_url is None:
        prefect_db = state_dir(project_dir) / "prefect" / "prefect.db"
        mlflow_db = project_dir / "mlflow" / "mlflow.db"
        prefect_db.parent.mkdir(parents=True, exist_ok=True)
        mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        described = f"SQLite {prefect_db} and {mlflow_db}; artifacts {artifacts}"
        return Stores(f"sqlite+aiosqlite:///{prefect_db}", f"sqlite:///{mlflow_db}", artifacts,
                      described)  # fmt: skip
    base = make_url(config.database_url).set(drivername="postgresql")
    names = {"prefect": f"{base.database}_prefect", "mlflow": f"{base.database}_mlflow"}
    ensure_databases(base, list(names.values()))
    prefect_url = base.set(drivername="postgresql+asyncpg", database=names["prefect"])
    mlflow_url = base.set(database=names["mlflow"])
    described = (
        f"PostgreSQL {redact(str(prefect_url))} and {redact(str(mlflow_url))}; "
        f"artifacts {artifacts}"
    )
    return Stores(_plain(prefect_url), _plain(mlflow_url), artifacts, described)


def _plain(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def ensure_databases(base: URL, names: list[str]) -> None:
    """CREATE DATABASE each missing name, through the server's `postgres` database."""
    import psycopg2
    from psycopg2 import sql

    admin = base.set(database="postgres")
    try:
        connection = psycopg2.connect(_plain(admin), connect_timeout=10)
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ServerError(
            f"server.database_url: cannot connect to PostgreSQL at {redact(str(base))}: {reason}"
        ) from None
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()


def port_free(port: int) -> bool:
    """Whether a server could listen on HOST:port now (with SO_REUSEADDR, as uvicorn binds:
    only a listening socket blocks it, not one lingering in TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def resolve_ports(config: ServerConfig) -> dict[str, int]:
    """The port of each server: the configured one (checked free) or a free one."""
    configured = {"prefect": config.prefect_port, "mlflow": config.mlflow_port}
    if configured["prefect"] and configured["prefect"] == configured["mlflow"]:
        raise ServerError(
            f"server.prefect_port and server.mlflow_port are both {configured['prefect']}"
        )
    for name, port in configured.items():
        if port and not port_free(port):
            raise ServerError(
                f"server.{name}_port={port}: port {port} on {HOST} is already in use "
                "(set another port, or 0 for a free one)"
            )
    return {name: port or _free_port() for name, port in configured.items()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class ServerPlan:
    """One server to start: its command, the settings it gets and where it answers."""

    name: str  # prefect | mlflow
    program: str  # the executable's name, checked in /proc/<pid>/cmdline before a kill
    argv: list[str]
    env: dict[str, str]  # on top of this process's environment; may hold a password
    url: str  # its UI
    client_url: str  # what clients point at (PREFECT_API_URL / MLFLOW_TRACKING_URI)
    health_url: str


def plan_servers(ports: dict[str, int], stores: Stores, project_dir: Path) -> list[ServerPlan]:
    prefect_url, mlflow_url = (f"http://{HOST}:{ports[name]}" for name in ("prefect", "mlflow"))
    prefect_env = {
        "PREFECT_HOME": str(state_dir(project_dir) / "prefect"),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
        # Else the UI's /ui-settings names :4200/api and every page says "Can't connect to
        # Server API" (docs/stack-notes.md).
        "PREFECT_UI_API_URL": f"{prefect_url}/api",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": stores.prefect_db_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    mlflow_env = {
        "MLFLOW_BACKEND_STORE_URI": stores.mlflow_store_uri,  # an env var: no password in argv
        # 2 processes and ~0.5 GB instead of 9 and ~2.5 GB (docs/stack-notes.md).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    prefect_argv = [str(BIN / "prefect"), "server", "start", "--host", HOST,
                    "--port", str(ports["prefect"])]  # fmt: skip
    mlflow_argv = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
                   "--artifacts-destination", stores.artifacts_uri, "--workers", "1"]  # fmt: skip
    return [
        ServerPlan("prefect", "prefect", prefect_argv, prefect_env, prefect_url,
                   f"{prefect_url}/api", f"{prefect_url}/api/health"),
        ServerPlan("mlflow", "mlflow", mlflow_argv, mlflow_env, mlflow_url, mlflow_url,
                   f"{mlflow_url}/health"),
    ]  # fmt: skip


def log_path(project_dir: Path, name: str) -> Path:
    return servers_dir(project_dir) / f"{name}.log"


def pid_path(project_dir: Path, name: str) -> Path:
    """The pid alone, for people and scripts (`kill -- -$(cat ...)`); `down` reads state.json,
    which also has the start time that tells this process from a later one with its pid."""
    return servers_dir(project_dir) / f"{name}.pid"


def spawn(plan: ServerPlan, project_dir: Path) -> subprocess.Popen:
    """Starts one server in its own session (its pid is its process group's id)."""
    # Not this shell's client settings: the server must not talk to another server.
    drop = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop} | plan.env
    with log_path(project_dir, plan.name).open("w") as log:
        process = subprocess.Popen(
            plan.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=servers_dir(project_dir), start_new_session=True,
        )  # fmt: skip
    pid_path(project_dir, plan.name).write_text(f"{process.pid}\n")
    return process


def record(plan: ServerPlan, process: subprocess.Popen, project_dir: Path) -> dict[str, Any]:
    status = process_status(process.pid)
    return {
        "pid": process.pid,
        "start_ticks": status[1] if status else -1,  # with the pid: this process, not a reuse
        "program": plan.program,
        "url": plan.url,
        "client_url": plan.client_url,
        "health_url": plan.health_url,
        "log": str(log_path(project_dir, plan.name)),
    }


def write_state(project_dir: Path, state: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    path = servers_state_path(project_dir)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(partial, path)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def wait_healthy(
    plans: list[ServerPlan], processes: list[subprocess.Popen], project_dir: Path, timeout_s: float
) -> dict[str, float]:
    """Seconds each server took to answer its health URL; ServerError with its log's tail
    when one exits or misses the deadline."""
    started = time.monotonic()
    ready: dict[str, float] = {}
    while len(ready) < len(plans):
        for plan, process in zip(plans, processes, strict=True):
            if plan.name in ready:
                continue
            if process.poll() is not None:
                raise ServerError(
                    f"the {plan.name} server exited during start-up (code {process.returncode}); "
                    f"{log_path(project_dir, plan.name)} ends:\n"
                    f"{log_tail(log_path(project_dir, plan.name))}"
                )
            if healthy(plan.health_url):
                ready[plan.name] = time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            late = [plan for plan in plans if plan.name not in ready]
            raise ServerError(
                f"{', '.join(p.name for p in late)} not healthy at {late[0].health_url} within "
                f"{timeout_s:.0f} s (server.start_timeout_s); "
                f"{log_path(project_dir, late[0].name)} ends:\n"
                f"{log_tail(log_path(project_dir, late[0].name))}"
            )
        time.sleep(0.25)
    return ready


@dataclass(frozen=True)
class Started:
    state: dict[str, Any]
    seconds: dict[str, float]  # start → healthy, per server


def up(config: ServerConfig, project_dir: Path) -> Started:
    """Checks everything it can before starting anything, then starts both servers and waits
    until both answer; on any failure stops what it started and leaves no record."""
    servers_dir(project_dir).mkdir(parents=True, exist_ok=True)
    refuse_if_running(project_dir)
    ports = resolve_ports(config)
    stores = resolve_stores(config, project_dir)
    plans = plan_servers(ports, stores, project_dir)
    processes: list[subprocess.Popen] = []
    state: dict[str, Any] = {"ready": False, "stores": stores.described, "servers": {}}
    try:
        for plan in plans:
            processes.append(spawn(plan, project_dir))
            state["servers"][plan.name] = record(plan, processes[-1], project_dir)
            write_state(project_dir, state)  # before the wait: `down` finds them if we die
        seconds = wait_healthy(plans, processes, project_dir, config.start_timeout_s)
    except BaseException:  # also Ctrl-C: no orphan servers
        for entry in state["servers"].values():
            stop_group(entry)
        clear_record(project_dir)
        raise
    state["ready"] = True
    write_state(project_dir, state)
    return Started(state, seconds)


def refuse_if_running(project_dir: Path) -> None:
    """ServerError if `up` already runs here; a stale record (dead processes) is cleared."""
    path = servers_state_path(project_dir)
    state = read_servers_state(path) if path.is_file() else None
    if state is not None and stale_reason(state.get("servers", {})) is None:
        urls = ", ".join(entry["url"] for entry in state["servers"].values())
        raise ServerError(
            f"servers already running for this project ({urls}): `sift server status`; "
            "`sift server down` first to start them with other settings"
        )
    for entry in (state or {}).get("servers", {}).values():
        stop_group(entry)  # only if still that process: a half-dead pair goes whole
    clear_record(project_dir)


@dataclass(frozen=True)
class Stopped:
    name: str
    pid: int
    outcome: str  # "stopped" | "not running" | "not ours"


def down(project_dir: Path) -> list[Stopped]:
    """Stops exactly what `up` recorded (after checking each pid is still that process) and
    removes the record; [] when nothing is recorded."""
    path = servers_state_path(project_dir)
    state = read_servers_state(path) if path.is_file() else None
    entries = (state or {}).get("servers", {})
    results = [Stopped(name, _pid(entry), stop_group(entry)) for name, entry in entries.items()]
    clear_record(project_dir)
    return results


def _pid(entry: dict[str, Any]) -> int:
    try:
        return int(entry["pid"])
    except (KeyError, TypeError, ValueError):
        return -1


def stop_group(entry: dict[str, Any]) -> str:
    """SIGTERM to the recorded process's group, SIGKILL after STOP_GRACE_S; only when it still
    is the group `up` started: its leader is the recorded process (same start time, program
    in its command line) or, the leader killed, every member started after it (its workers:
    the kernel reuses no pid while a group of that id exists)."""
    pid = _pid(entry)
    members = group_members(pid) if pid > 0 else []
    if not members:
        return "not running"
    if process_status(pid) is not None:
        if not process_matches(entry) or os.getpgid(pid) != pid:
            return "not ours"
    elif not all(_started_since(member, entry) for member in members):
        return "not ours"
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_members(pid):
        os.killpg(pid, signal.SIGKILL)
        while group_members(pid):
            time.sleep(0.1)
    return "stopped"


def _started_since(pid: int, entry: dict[str, Any]) -> bool:
    status = process_status(pid)
    return status is not None and status[1] >= int(entry.get("start_ticks", 1 << 62))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc/<pid>/stat (field 5)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(stat_path.parent.name))
    return members


def clear_record(project_dir: Path) -> None:
    for path in (servers_state_path(project_dir), *(pid_path(project_dir, n)
                                                    for n in ("prefect", "mlflow"))):  # fmt: skip
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ServerStatus:
    name: str
    pid: int
    url: str
    running: bool
    healthy: bool


def status(project_dir: Path) -> list[ServerStatus] | None:
    """Each recorded server: is its process the one `up` started, does it answer its health
    URL; None when nothing is recorded."""
    path = servers_state_path(project_dir)
    state = read_servers_state(path) if path.is_file() else None
    if state is None:
        return None
    result = []
    for name, entry in state.get("servers", {}).items():
        running = process_matches(entry)
        result.append(ServerStatus(name, _pid(entry), str(entry.get("url")), running,
                                   running and healthy(str(entry.get("health_url")))))  # fmt: skip
    return result
