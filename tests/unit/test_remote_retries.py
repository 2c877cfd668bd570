"""tracking.remote_retry_delays sets the retries of the tasks that talk to remotes."""

from __future__ import annotations

from flows.tasks import REMOTE_RETRIES, register_task, with_remote_retries
from steps.tracking import TrackingConfig


def test_the_defaults_wait_5_15_and_30_seconds() -> None:
    assert TrackingConfig().remote_retry_delays == (5.0, 15.0, 30.0)
    assert register_task.retries == 3 == REMOTE_RETRIES["retries"]
    assert register_task.retry_delay_seconds == [5.0, 15.0, 30.0]


def test_a_run_sets_its_own_waits_and_keeps_the_retry_condition() -> None:
    retried = with_remote_retries(
        register_task, TrackingConfig(remote_retry_delays=[1, 2]).remote_retry_delays
    )
    assert (retried.retries, retried.retry_delay_seconds) == (2, [1.0, 2.0])
    assert retried.retry_condition_fn is register_task.retry_condition_fn  # corrupt bytes: final
    assert retried.name == register_task.name
    none = with_remote_retries(
        register_task, TrackingConfig(remote_retry_delays=[]).remote_retry_delays
    )
    assert none.retries == 0
