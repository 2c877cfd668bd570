"""The registry lock: one Prefect global-concurrency slot per registered model.

MLflow has no compare-and-set on aliases, so the champion gate (read the champion, compare,
move the alias) of two runs finishing together could both read the same old champion, and
the later write would win whatever its loss. The gate and the manual moves (`sift promote`,
`sift rollback`) therefore run holding this slot, on the run's Prefect API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

# MLflow has no compare-and-set on aliases: two runs promoting at once could both read the
# old champion and the later write would win whatever its loss. So promote's read-compare-
# move runs holding the one slot of a Prefect global concurrency limit per registered model,
# on the run's Prefect API (a server, or the ephemeral API's database that every `sift run`
# of a project shares under .sift/prefect). The slot is a lease the holder renews while it
# works: a Prefect server takes back the slot of a run that died; the ephemeral API runs no
# such service, so a run killed (-9) while promoting leaves it taken until freed by hand.
# https://docs.prefect.io/v3/how-to-guides/workflows/global-concurrency-limits
REGISTRY_LOCK_PREFIX = "sift-registry-"
# Bounds the wait for a slot left taken, not a holder's work: a promotion takes seconds, or
# one re-scoring of the champion when the eval data changed (minutes on a large model).
REGISTRY_LOCK_WAIT_SECONDS = 1800.0


class RegistryLockError(RuntimeError):
    """The registry lock is set up wrongly or stayed taken: a retry cannot fix either."""


def registry_lock_name(model_name: str) -> str:
    """sift-registry-<model name>; characters Prefect bans in names (/ % & > <) become '-'
    (two models then share one lock: more waiting, never a lost promotion)."""
    return REGISTRY_LOCK_PREFIX + re.sub(r"[/%&><]", "-", model_name)


def ensure_registry_lock(name: str) -> None:
    """Creates the global concurrency limit `name` with one slot unless it exists; an
    existing one must have one slot and be active, or the lock would not exclude."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # ObjectAlreadyExists: another run created it between the read and the create
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            return
    if existing.limit != 1 or not existing.active:
        raise RegistryLockError(
            f"Prefect concurrency limit {name!r} has limit={existing.limit}, "
            f"active={existing.active}: it must be limit=1 and active to serialise promotions "
            f"(prefect gcl update {name} --limit 1 --enable)"
        )


@contextmanager
def registry_lock(
    model_name: str, wait_seconds: float = REGISTRY_LOCK_WAIT_SECONDS
) -> Iterator[None]:
    """Holds model_name's registry slot for the body; RegistryLockError after wait_seconds."""
    name = registry_lock_name(model_name)
    ensure_registry_lock(name)
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True):
            acquired = True
            yield
    except TimeoutError as error:
        if acquired:
            raise  # the body's own timeout (a socket's, say), not the lock's
        raise RegistryLockError(
            f"registry lock {name!r}: no slot within {wait_seconds:.0f} s. Another run is "
            "promoting, or one killed while promoting left the slot taken; if no run is "
            f"promoting, free it: prefect gcl update {name} --active-slots 0"
        ) from error
