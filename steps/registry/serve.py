"""Serve: a registered version behind `mlflow models serve`, found in the registry first.

A version is named as people write it: `<name>@<alias>`, `<name>/<version>`, or either as a
`models:/` URI. It is resolved before anything starts, so a typo is one line naming what
exists, and the server is handed the pinned version (`models:/<name>/<version>`): an alias
that moves while the model loads cannot swap what this server says it serves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from steps.processes import die_with_parent

DEFAULT_PORT = 5001  # 5000 is `make ui`'s MLflow UI: both can run side by side
# Hosts that mean "every interface": a readiness probe has to go to one address instead.
ANY_HOST = {"0.0.0.0", "::", ""}


class ServeError(ValueError):
    """A model, alias, version or port that cannot be served; the message names it."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str | None  # the alias it was asked for by, if any
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def describe(self) -> str:
        asked = f"@{self.alias} = " if self.alias else ""
        return f"{self.name} {asked}version {self.version}"


def parse_model_spec(text: str) -> tuple[str, str | None, str | None]:
    """'sift-gsm8k@champion' → (name, alias, None); 'models:/sift-gsm8k/3' → (name, None, '3')."""
    body = text.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        version = None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
        if not version.isdigit():
            raise ServeError(f"MODEL {text!r}: version {version!r} is not a number (e.g. {name}/3)")
    else:
        raise ServeError(
            f"MODEL {text!r} names no alias or version: use {body}@champion or {body}/<version>"
        )
    if not name or (alias is not None and not alias):
        raise ServeError(f"MODEL {text!r}: expected <name>@<alias> or <name>/<version>")
    return name, alias, version


def resolve_model(text: str, client: MlflowClient | None = None) -> ServedModel:
    """The registered version `text` names, in the current registry; ServeError if it has none."""
    client = client or MlflowClient()
    name, alias, version = parse_model_spec(text)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [model.name for model in client.search_registered_models(max_results=20)]
        raise ServeError(
            f"MODEL {text!r}: no registered model {name!r} (registered: "
            f"{', '.join(known) or 'none'})"
        ) from None
    aliases = dict(registered.aliases or {})
    if alias is not None:
        if alias not in aliases:
            listed = ", ".join(f"@{a}={v}" for a, v in sorted(aliases.items())) or "none"
            raise ServeError(f"MODEL {text!r}: {name!r} has no alias {alias!r} (aliases: {listed})")
        version = str(aliases[alias])
    assert version is not None  # parse_model_spec returns an alias or a version
    try:
        found = client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(
            (int(v.version) for v in client.search_model_versions(f"name='{name}'")), reverse=True
        )
        raise ServeError(
            f"MODEL {text!r}: {name!r} has no version {version} (versions: "
            f"{', '.join(map(str, versions[:20])) or 'none'})"
        ) from None
    return ServedModel(name, str(found.version), alias, found.run_id)


def check_port_free(host: str, port: int) -> None:
    """ServeError naming --port when something already listens there (found before loading)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a server just stopped is free to it
        # (on Linux a listening socket still refuses the bind).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            message = f"--port {port}: cannot listen on {host}:{port} ({error.strerror})"
            raise ServeError(message) from None


def serve_command(model: ServedModel, host: str, port: int) -> list[str]:
    """`mlflow models serve` from this interpreter, in this environment (the model's pinned
    requirements are the lock file's: --env-manager local builds no second environment)."""
    return [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", model.uri),
        *("--env-manager", "local", "--host", host, "--port", str(port)),
    ]


def server_env(tracking_uri: str) -> dict[str, str]:
    """The child's environment: the registry it resolves models:/ in is the one we checked,
    and this interpreter's bin/ first on PATH (mlflow execs `uvicorn` by name; an un-activated
    .venv would otherwise fail with "uvicorn: not found")."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    uris = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    return {**os.environ, **uris, "PATH": path}


def base_url(host: str, port: int) -> str:
    reachable = "127.0.0.1" if host in ANY_HOST else host
    return f"http://[{reachable}]:{port}" if ":" in reachable else f"http://{reachable}:{port}"


def invocation_body(prompt: str) -> dict:
    """A request the transformers text-generation flavour accepts: `inputs` lists the prompts
    (its signature is one string column). The signature declares no params, so the length of
    a completion is the generation config's max_new_tokens (registry.max_new_tokens)."""
    return {"inputs": [prompt]}


def curl_example(url: str, prompt: str) -> str:
    body = json.dumps(invocation_body(prompt))
    return f"curl -s {url}/invocations -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def start_server(
    command: list[str], env: dict[str, str], log: IO[bytes] | None = None
) -> subprocess.Popen:
    """The server in a session of its own: Ctrl-C reaches only us, and stop_server ends the
    whole group (mlflow's CLI process and the uvicorn server it starts). log: where its
    output goes (None: this terminal)."""
    return subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
    )


def wait_until_ready(
    url: str, process: subprocess.Popen, timeout_s: float | None, probe: str = "/ping"
) -> None:
    """Polls GET url+probe until it answers 200; ServeError if the server exits or timeout_s
    passes (None: no limit, as a large model may take minutes to download and load)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(
                f"the server (pid {process.pid}) exited with code {process.returncode} "
                f"before {url}{probe} answered (its log is above)"
            )
        try:
            with urllib.request.urlopen(f"{url}{probe}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServeError(f"{url}{probe} did not answer within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM to the server's process group (its pid leads it), SIGKILL to whatever is left
    after grace_s; returns once the whole group is gone (uvicorn outlives mlflow's CLI by a
    second or two while it shuts down, holding the port)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(process):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace_s
        while _group_alive(process) and time.monotonic() < deadline:
            time.sleep(0.1)
    return process.wait()


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reaps the leader once it exits: a zombie would count as alive
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True
