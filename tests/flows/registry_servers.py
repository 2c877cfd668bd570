"""Real servers for registry tests: `mlflow server` on SQLite or PostgreSQL, a Prefect server,
a fresh PostgreSQL database, and an outage switch between a client and the MLflow server.

Every server binds 127.0.0.1 on a free port and is stopped by its own pid (its process group,
which is that pid: uvicorn's workers die with it), also when the test fails.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
# The MLflow client retries a refused connection for minutes by default; these make an
# outage fail a request at once, so the run's own retries are what the test sees.
NO_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mlflow_client(uri: str):
    """A client of exactly this store: its registry too. Without registry_uri it follows the
    process-wide registry URI, which an earlier test may have set to its own store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def clean_env() -> dict[str, str]:
    """This process's environment without its Prefect/MLflow settings (the harness's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({process.returncode}): {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"{url}: no answer within {timeout:.0f} s: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class MlflowServer:
    """`mlflow server` on one backend store and artifact folder; start() again after stop()
    serves the same store (a new port: the old one may linger in TIME_WAIT)."""

    def __init__(self, backend_uri: str, artifacts_dir: Path, log_dir: Path):
        self.backend_uri, self.artifacts_dir, self.log_dir = backend_uri, artifacts_dir, log_dir
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.port, self.starts = free_port(), self.starts + 1
        log = self.log_dir / f"mlflow-server-{self.starts}.log"
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
                   "--artifacts-destination", self.artifacts_dir.as_uri(),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        # As `sift server up` runs it: without the GenAI job runners (huey consumers), which
        # Sift never uses: 2 processes instead of 9, each of the 7 importing MLflow anew.
        env = clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                             "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
        with log.open("w") as handle:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group, stopped by its pid
            )  # fmt: skip
        _wait_until_up(f"{self.url}/health", self.process, log, timeout=180)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@contextmanager
def mlflow_server(backend_uri: str, work_dir: Path) -> Iterator[MlflowServer]:
    (work_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend_uri, work_dir / "artifacts", work_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME (SQLite); yields its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_env() | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    log = home / "server.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/api/health", process, log, timeout=180)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        _stop(process)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres),
    dropped afterwards; skips the test when no such server is reachable."""
    import psycopg2

    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 with trust auth for user postgres: {error}")
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    name = f"sift_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


class OutageProxy:
    """An HTTP relay in front of an MLflow server that, once `trip` is true of a request it
    has relayed, calls `on_trip` before answering the client: the registry goes down at one
    exact point of a client's sequence of requests. `on_trip` may stop the server (`target`
    can be re-pointed at a restarted one) or set `down`; either way the client sees 503 for
    every later request until the registry is back: while `down` is set the relay answers
    503 itself, as it does while nothing listens at `target`. `refused` counts those 503s.
    `down` spares a test the server's restart (seconds of start-up) and keeps a shared
    server serving other tests' models."""

    def __init__(self, target: str, trip: Callable[[str, str], bool], on_trip: Callable[[], None]):
        self.target, self.trip, self.on_trip = target, trip, on_trip
        self.tripped = threading.Event()
        self.down = threading.Event()
        self.refused = 0
        proxy = self

        class Relay(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                proxy.refused += 1
                self.send_error(503, "registry down")

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.down.is_set():
                    self._refuse()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                host = proxy.target.removeprefix("http://")
                upstream = http.client.HTTPConnection(host, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    status, reply_headers, data = reply.status, reply.getheaders(), reply.read()
                except OSError:
                    self._refuse()
                    return
                finally:
                    upstream.close()
                if not proxy.tripped.is_set() and proxy.trip(self.command, self.path):
                    proxy.tripped.set()
                    proxy.on_trip()
                self.send_response(status)
                for key, value in reply_headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test's output stays readable

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Relay)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[OutageProxy]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
