"""SIGTERM stops a run even when it lands in a finaliser (flows/runtime.py stop_on_sigterm).

Prefect's flow engine turns SIGTERM into a TerminationSignal raised wherever the main thread
is; raised inside a `__del__` (asyncio transports are collected at a flow's start), Python
only prints "Exception ignored in" and the run carried on: one SIGTERM in two was lost.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest
from prefect.utilities.engine import capture_sigterm

from flows.runtime import Terminated, stop_on_sigterm


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
