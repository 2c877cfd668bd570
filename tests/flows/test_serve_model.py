"""`sift serve-model`: a registered version served by `mlflow models serve`, refused with one
line when the registry has no such version, stopped with the command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import transformers
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from steps.registry.register import RegisterConfig, register_model
from steps.registry.serve import (
    ServeError,
    check_port_free,
    invocation_body,
    parse_model_spec,
    stop_server,
    wait_until_ready,
)
from tests.conftest import MODEL_DIR

NAME = "sift-serve"
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def registry(tmp_path: Path):
    """A registry of this test's own (the URIs are process-wide: restored after)."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sift-gsm8k@champion", ("sift-gsm8k", "champion", None)),
        ("models:/sift-gsm8k@challenger", ("sift-gsm8k", "challenger", None)),
        ("sift-gsm8k/3", ("sift-gsm8k", None, "3")),
        ("models:/team/sift-gsm8k/12", ("team/sift-gsm8k", None, "12")),
    ],
)
def test_model_spec_reads_alias_version_and_models_uris(text, expected):
    assert parse_model_spec(text) == expected


@pytest.mark.parametrize("text", ["sift-gsm8k", "sift-gsm8k/latest", "@champion"])
def test_model_spec_without_a_version_or_alias_is_refused_naming_it(text):
    with pytest.raises(ServeError, match="MODEL"):
        parse_model_spec(text)


@pytest.fixture(scope="module")
def store_without_versions(tmp_path_factory) -> str:
    """A store holding NAME with no version: made once (a new SQLite store takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('serve-refusals') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model(NAME)
    return uri


@pytest.fixture
def restored_uris():
    """The command sets MLflow's process-wide URIs to the store it serves from: put them back."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nosuch@champion", "no registered model 'nosuch' (registered: sift-serve)"),
        (f"{NAME}@champion", f"'{NAME}' has no alias 'champion' (aliases: none)"),
        (f"{NAME}/4", f"'{NAME}' has no version 4 (versions: none)"),
    ],
)
def test_serve_model_refuses_a_missing_model_in_one_line_before_starting_anything(
    store_without_versions: str, restored_uris, tmp_path: Path, model: str, message: str
):
    project = tmp_path / "project"
    args = ["serve-model", model, "--project-dir", str(project)]
    result = runner.invoke(app, [*args, "--set", f"tracking.tracking_uri={store_without_versions}"])
    assert result.exit_code == 2
    assert result.output.strip() == f"MODEL {model!r}: {message}"
    assert not project.exists()  # nothing written: not even .sift/


def test_serve_model_refuses_a_missing_sqlite_store_without_creating_it(tmp_path: Path):
    store = tmp_path / "typo" / "mlflow.db"
    args = ["serve-model", f"{NAME}@champion", "--project-dir", str(tmp_path)]
    result = runner.invoke(app, [*args, "--set", f"tracking.tracking_uri=sqlite:///{store}"])
    assert result.exit_code == 2 and "tracking.tracking_uri" in result.output
    assert not store.parent.exists()


def _register_champion(tmp_path: Path) -> str:
    """The bundled tiny model as version 1 of NAME, aliased champion; returns the version."""
    client = MlflowClient()
    experiment = client.create_experiment("serve", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    version = register_model(str(MODEL_DIR), run_id, RegisterConfig(model_name=NAME), {})
    client.set_registered_model_alias(NAME, "champion", version.version)
    return version.version


@pytest.mark.slow
def test_served_champion_completes_a_prompt_and_ctrl_c_stops_the_server(
    registry: str, tmp_path: Path
):
    _register_champion(tmp_path)
    pipeline = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    assert isinstance(pipeline, transformers.Pipeline)  # the stock client still loads it

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    sift = str(Path(sys.executable).parent / "sift")
    command = [sift, "serve-model", f"{NAME}@champion", "--port", str(port)]
    command += ["--project-dir", str(tmp_path), "--set", f"tracking.tracking_uri={registry}"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        # Its own session, as a terminal's foreground job is: the SIGINT below reaches sift
        # alone, and stopping the server is sift's work.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread
            # A terminal's job gets SIGINT's default action; one started under `cmd &` in a
            # non-interactive shell (a CI runner) inherits it ignored, and Python then
            # installs no KeyboardInterrupt: sift would sleep through this Ctrl-C.
            preexec_fn=_default_sigint,
        )
    try:
        wait_until_ready(url, process, timeout_s=240)
        prompt = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(invocation_body(prompt)).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        # The text-generation pipeline returns the prompt followed by what it generated.
        assert len(predictions) == 1 and predictions[0].startswith(prompt)
        assert predictions[0].removeprefix(prompt).strip(), "empty completion"

        # sift polls the server itself before it prints the curl call: wait for that line
        deadline = time.monotonic() + 60
        while "curl -s" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert _exit_code(process, log_path, timeout_s=120) == 0
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # nothing listens any more: sift stopped the server it started
    finally:
        stop_server(process)  # by its pid's process group, whatever happened above
        output = log_path.read_text()
    assert f"serving {NAME} @champion = version 1" in output
    assert f"curl -s {url}/invocations" in output and "stopped the server" in output


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _exit_code(process: subprocess.Popen, log_path: Path, timeout_s: float) -> int:
    """process's exit code; one still running after timeout_s is failed with its threads'
    stacks (faulthandler, on SIGABRT) and the end of its log."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(timeout=30)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-80:])
        pytest.fail(f"sift did not exit {timeout_s:.0f} s after Ctrl-C; its log ends:\n{tail}")


def test_a_port_in_use_is_refused_naming_the_port_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
