"""Process-level settings that must exist before Prefect, DVC or MLflow are imported.

Prefect reads PREFECT_HOME and its result path once, at import; setting them later is
silently ignored (docs/stack-notes.md). Values already in the environment win, so pointing
PREFECT_API_URL / MLFLOW_TRACKING_URI at servers needs no code change; without them, the
servers `sift server up` started for this project (`.sift/servers/state.json`) are used while
their processes run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Which variable points a client at each server `sift server up` records.
CLIENT_ENV = {"prefect": "PREFECT_API_URL", "mlflow": "MLFLOW_TRACKING_URI"}


def state_dir(project_dir: Path) -> Path:
    """Everything Sift writes that is not versioned: caches, staged data, trained models."""
    return project_dir / ".sift"


def servers_dir(project_dir: Path) -> Path:
    """Pid files, logs and state.json of the servers `sift server up` started."""
    return state_dir(project_dir) / "servers"


def servers_state_path(project_dir: Path) -> Path:
    return servers_dir(project_dir) / "state.json"


def configure_environment(project_dir: Path) -> None:
    state = state_dir(project_dir).resolve()
    (state / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    defaults = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(state / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The ephemeral API's 20 s start-up limit was missed on a loaded 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        # lm-eval reads benchmark data through `datasets` (its Arrow cache) and keeps its own
        # request cache (unused by Sift) in site-packages unless told otherwise: both here.
        "HF_DATASETS_CACHE": str(state / "hf-datasets"),
        "LM_HARNESS_CACHE_PATH": str(state / "lm-eval-cache"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key, (quiet, _) in LOG_LEVEL_ENV.items():  # unless configure_logging chose already
        os.environ.setdefault(key, quiet)
    use_recorded_servers(project_dir)


# The libraries' own log levels, by the variables each reads (in this process and in the
# workers it starts): their warnings by default, their INFO chatter with --verbose.
# Prefect's console handler rather than PREFECT_LOGGING_LEVEL=WARNING, which also kept INFO
# records (log_prints lines) from the API: "This run didn't generate logs". Handler levels
# are overridable as PREFECT_LOGGING_[PATH]_[KEY] (prefect/logging/logging.yml).
LOG_LEVEL_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": ("WARNING", "INFO"),
    "MLFLOW_LOGGING_LEVEL": ("WARNING", "INFO"),
    "TRANSFORMERS_VERBOSITY": ("warning", "info"),
}
# Loggers of libraries imported before a command runs (the variables above come too late
# for them: each reads its level once, at import) or that log through the root logger.
LIBRARY_LOGGERS = ("mlflow", "transformers", "dvc", "great_expectations", "lm_eval", "lm-eval")


def configure_logging(verbose: bool) -> None:
    """Library logs on stderr: warnings only, or (verbose) INFO records too. A variable
    already in the environment wins over the default, never over --verbose."""
    for key, (quiet, loud) in LOG_LEVEL_ENV.items():
        if verbose:
            os.environ[key] = loud
        else:
            os.environ.setdefault(key, quiet)
    level = logging.INFO if verbose else logging.WARNING
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if verbose and not logger.handlers:  # without one, only the root's WARNING+ show
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
    if "transformers" in sys.modules:  # its own handler reads TRANSFORMERS_VERBOSITY once
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(level)
    _loading_bars(verbose)


def _loading_bars(verbose: bool) -> None:
    """transformers draws a "Loading weights" bar on every from_pretrained, a dozen a run,
    each over in a blink: shown with --verbose only. Its other bars (a hub download, a GGUF
    being de-quantized) stay: those are long work."""
    from transformers.utils.logging import set_tqdm_hook

    set_tqdm_hook(None if verbose else _without_loading_bar)


def _without_loading_bar(
    factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if kwargs.get("desc") == "Loading weights":
        return factory(*args, **{**kwargs, "disable": True})
    return factory(*args, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test runner may have swapped it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def use_recorded_servers(project_dir: Path) -> None:
    """Points clients at the servers `sift server up` recorded, while they run; writes
    nothing, so read-only commands (lineage, serve-model) call it before anything else."""
    for key, value in recorded_server_env(project_dir).items():
        os.environ.setdefault(key, value)


def recorded_server_env(project_dir: Path) -> dict[str, str]:
    """PREFECT_API_URL / MLFLOW_TRACKING_URI of the servers `sift server up` recorded, when
    every recorded process still runs; {} otherwise. A stale record (a crash, a reboot) must
    not point runs at dead servers: it is ignored, with one note on stderr."""
    path = servers_state_path(project_dir)
    if not path.is_file():
        return {}
    state = read_servers_state(path)
    servers = state.get("servers", {}) if state else {}
    problem = stale_reason(servers) if state and state.get("ready") else "servers not ready"
    if problem:
        _note_once(f"sift: ignoring {path}: {problem}; `sift server down` clears the record")
        return {}
    return {CLIENT_ENV[name]: entry["client_url"] for name, entry in servers.items()}


def read_servers_state(path: Path) -> dict[str, Any] | None:
    """state.json's content; None when it is not a JSON object (a torn or edited file)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def stale_reason(servers: dict[str, Any]) -> str | None:
    """Why the recorded servers cannot be used (which one is not running); None if all run."""
    if set(servers) != set(CLIENT_ENV):
        return f"expected servers {sorted(CLIENT_ENV)}, found {sorted(servers)}"
    for name, entry in servers.items():
        if not process_matches(entry):
            return f"the {name} server recorded there (pid {entry.get('pid')}) is not running"
    return None


def process_matches(entry: dict[str, Any]) -> bool:
    """True while the recorded process runs: same pid, same start time (a reused pid has
    another), and its command line still names the recorded program."""
    try:
        pid, start_ticks, program = int(entry["pid"]), int(entry["start_ticks"]), entry["program"]
    except (KeyError, TypeError, ValueError):
        return False
    status = process_status(pid)
    if status is None or status[1] != start_ticks:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == program for arg in argv)


def process_status(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a live process, from
    /proc/<pid>/stat (proc(5): fields 3 and 22); None when there is none or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may itself hold spaces and ')'.
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[0], int(fields[19])


@functools.cache
def _note_once(message: str) -> None:
    print(message, file=sys.stderr)


# After a SIGTERM lost in a finaliser, it is sent again this much later: by then the main
# thread has left the finaliser (microseconds), and a run stops 0.1 s later than it could.
REDELIVERY_DELAY_S = 0.1


class Terminated(BaseException):
    """SIGTERM stopped the command (a BaseException, as KeyboardInterrupt: no `except
    Exception` may carry on past it; tracking marks the run KILLED)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def is_termination(error: BaseException | None) -> bool:
    """Terminated, or Prefect's TerminationSignal (looked up, not imported: Prefect reads its
    settings at import, and a hook must not be the first to import it)."""
    prefect_signal = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", None)
    return isinstance(error, Terminated) or (
        prefect_signal is not None and isinstance(error, prefect_signal)
    )


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread, and is never lost on the way.

    A signal handler's exception is raised wherever the main thread is, and one raised inside
    a finaliser (`__del__`, a weakref callback: Python only prints "Exception ignored in") is
    gone: Prefect's flow engine handles SIGTERM by raising TerminationSignal, and a SIGTERM
    landing while asyncio transports were collected was swallowed so, and the run carried on.
    So the exception of a SIGTERM that Python reports as unraisable sends SIGTERM again, and
    the handler raises once the main thread runs ordinary code. Prefect's engine, on its own
    TerminationSignal, restores this handler and sends SIGTERM again, which raises Terminated.
    """
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if is_termination(unraisable.exc_value):
            # From another thread, a moment later: sent here, the handler would run inside
            # this hook, whose exceptions are dropped too.
            threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous_handler)
