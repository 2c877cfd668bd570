"""SIGTERM stops a run even when it lands in a finaliser (flows/runtime.py stop_on_sigterm),
and not in the middle of an alias move (steps/registry/aliases.py).

Prefect's flow engine turns SIGTERM into a TerminationSignal raised wherever the main thread
is; raised inside a `__del__` (asyncio transports are collected at a flow's start), Python
only prints "Exception ignored in" and the run carried on: one SIGTERM in two was lost.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.utilities.engine import capture_sigterm

from flows.runtime import Terminated, stop_on_sigterm
from steps.registry.aliases import PROMOTE_REASON, history, move_alias


class _SignalledWhileCollected:
    """An object whose finaliser receives SIGTERM, as a collected transport did."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)
        sum(range(100))  # the handler runs here, inside the finaliser


def test_a_sigterm_raised_inside_a_finaliser_still_stops_the_flow_engine():
    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    started = time.monotonic()
    # capture_sigterm: Prefect's handler, as in a flow run
    with pytest.raises(Terminated), stop_on_sigterm(), capture_sigterm():
        _SignalledWhileCollected()  # collected at once: its finaliser gets the signal
        time.sleep(10)  # the run going on: the signal, delivered again, stops it
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook


class _StoppedRightAfterTheAliasMoves(MlflowClient):
    """A real client of a real store, whose process gets SIGTERM right after an alias moves
    (before the move's audit event and version tags are written)."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        super().set_registered_model_alias(name, alias, version)
        signal.raise_signal(signal.SIGTERM)


def test_a_sigterm_during_an_alias_move_takes_effect_once_the_move_is_recorded(
    tmp_path: Path, empty_store
):
    uri = empty_store(tmp_path / "mlflow.db")
    client = _StoppedRightAfterTheAliasMoves(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("sift-sigterm")
    client.create_model_version("sift-sigterm", source=str(tmp_path))
    with pytest.raises(Terminated), stop_on_sigterm():
        move_alias(client, "sift-sigterm", "champion", "1", kind="manual", reason="by hand")
    assert str(client.get_model_version_by_alias("sift-sigterm", "champion").version) == "1"
    assert [event.to_version for event in history(client, "sift-sigterm")] == ["1"]
    assert client.get_model_version("sift-sigterm", "1").tags[PROMOTE_REASON] == "by hand"
