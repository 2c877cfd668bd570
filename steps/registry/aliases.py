"""Alias moves with an audit trail: promote and roll back by hand, and the history of both.

Every move of an alias (the automatic gate's and a person's) appends one event to the
registered model's audit history. Each event is a registered-model tag of its own, keyed
`sift.audit.<UTC time with microseconds>.<6 random hex>`: MLflow sets one tag key at a time
(an upsert), so two processes appending at once write two keys and neither event is lost,
which a read-modify-write of one JSON tag could not promise. The history is those tags
sorted by key (the key starts with the time, fixed width, so key order is time order).
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.tracking import MlflowClient

from steps.tracking import os_user

AUDIT_PREFIX = "sift.audit."
KINDS = ("auto", "manual", "rollback")
# Tags the promoted version carries about its latest move (the history keeps every one).
PROMOTED_BY, PROMOTED_AT = "sift.promoted_by", "sift.promoted_at"
PROMOTE_REASON, PROMOTE_KIND = "sift.promote_reason", "sift.promote_kind"
PREVIOUS_CHAMPION = "sift.previous_champion"
EVAL_LOSS, EVAL_MD5 = "sift.eval_loss", "sift.eval_md5"


class RegistryError(ValueError):
    """A request the registry cannot honour; the message names the model, version or flag."""


@dataclass(frozen=True)
class AliasEvent:
    """One decision about an alias: moved from_version → to_version, or (moved=False) a
    candidate to_version the automatic gate compared and kept out."""

    at: str  # UTC, ISO 8601 with microseconds
    who: str
    kind: str  # one of KINDS
    alias: str
    from_version: str | None  # None: the alias pointed nowhere before
    to_version: str
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    moved: bool = True


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    *,
    kind: str,
    reason: str,
    numbers: dict[str, float] | None = None,
) -> AliasEvent:
    """Points name@alias at version, tags the version with who/when/why/previous holder,
    and appends the move to the audit history."""
    if kind not in KINDS:
        raise RegistryError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    previous = alias_version(client, name, alias)
    event = _event(kind, alias, previous, version, reason, numbers or {}, moved=True)
    tags = {
        PROMOTED_BY: event.who,
        PROMOTED_AT: event.at,
        PROMOTE_REASON: reason,
        PROMOTE_KIND: kind,
        PREVIOUS_CHAMPION: previous or "none",
    }
    with _signals_held():  # a run stopped here left the alias moved with no history entry
        client.set_registered_model_alias(name, alias, version)
        append_event(client, name, event)  # first: the move is in the history before the rest
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    return event


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT that arrive in the body take effect when it ends (the handlers in
    place then run): the writes of one alias move all happen, or none of them. Off the main
    thread, where Python runs no signal handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda number, frame: held.append(number))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for held_signal, handler in previous.items():
            signal.signal(held_signal, handler)
        for number in held:
            signal.raise_signal(number)


def record_kept(
    client: MlflowClient,
    name: str,
    alias: str,
    candidate: str,
    *,
    reason: str,
    numbers: dict[str, float],
) -> AliasEvent:
    """Appends the automatic gate's decision to leave name@alias where it is (candidate lost)."""
    previous = alias_version(client, name, alias)
    event = _event("auto", alias, previous, candidate, reason, numbers, moved=False)
    append_event(client, name, event)
    return event


def append_event(client: MlflowClient, name: str, event: AliasEvent) -> None:
    stamp = datetime.fromisoformat(event.at).strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"{AUDIT_PREFIX}{stamp}.{secrets.token_hex(3)}"
    client.set_registered_model_tag(name, key, json.dumps(asdict(event), sort_keys=True))


def history(client: MlflowClient, name: str) -> list[AliasEvent]:
    """Every recorded decision about name's aliases, oldest first."""
    tags = registered_model(client, name).tags
    events = []
    for key in sorted(tags):
        if key.startswith(AUDIT_PREFIX):
            try:
                events.append(AliasEvent(**json.loads(tags[key])))
            except (ValueError, TypeError) as error:
                raise RegistryError(f"{name}: audit tag {key} is not an event: {error}") from None
    return events


def previous_holder(events: list[AliasEvent], alias: str, current: str | None) -> str | None:
    """The version that held alias before current, replaying the history as a stack: a move
    pushes its target, a rollback pops back to the version it restored, so rolling back
    twice walks two champions back (not back and forth between the last two)."""
    stack: list[str] = []
    for event in events:
        if event.alias != alias or not event.moved:
            continue
        if event.kind == "rollback" and event.to_version in stack:
            # keep the stack up to the restored version's last place in it
            del stack[len(stack) - stack[::-1].index(event.to_version) :]
        elif not stack or stack[-1] != event.to_version:
            stack.append(event.to_version)
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)  # moved outside Sift (the MLflow UI): still the one to leave
    return stack[-2] if len(stack) >= 2 else None


def promote_by_hand(
    client: MlflowClient, name: str, version: str, alias: str, *, reason: str, force: bool
) -> AliasEvent | None:
    """Moves name@alias to version for a person's reason; None when it is there already."""
    if not reason.strip():
        raise RegistryError("--reason is empty: say why this version becomes the champion")
    target = model_version(client, name, version)
    current = alias_version(client, name, alias)
    if current == str(target.version):
        return None
    return _move_checked(client, name, alias, target, current, "manual", reason, force)


def rollback(
    client: MlflowClient,
    name: str,
    alias: str,
    *,
    to: str | None,
    force: bool,
    reason: str | None = None,
) -> AliasEvent:
    """Moves name@alias back to `to`, or to the version that held it before the current one."""
    current = alias_version(client, name, alias)
    if to is None:
        to = previous_holder(history(client, name), alias, current)
        if to is None:
            where = f"version {current} is the first in the audit history" if current else "unset"
            raise RegistryError(
                f"{name}@{alias}: no earlier {alias} to roll back to ({where}); "
                "name one with --to <version>"
            )
    target = model_version(client, name, to)
    if current == str(target.version):
        raise RegistryError(f"{name}@{alias} is already version {current}: nothing to roll back")
    reason = reason or f"rolled back from version {current}"
    return _move_checked(client, name, alias, target, current, "rollback", reason, force)


def _move_checked(
    client: MlflowClient,
    name: str,
    alias: str,
    target: ModelVersion,
    current: str | None,
    kind: str,
    reason: str,
    force: bool,
) -> AliasEvent:
    """The move, unless the two versions were evaluated on different data (and no --force):
    their losses would then not be comparable, which is what the champion promises."""
    numbers = _losses(target, "eval_loss")
    if current is not None:
        champion = model_version(client, name, current)
        numbers |= _losses(champion, "previous_eval_loss")
        ours, theirs = target.tags.get(EVAL_MD5), champion.tags.get(EVAL_MD5)
        if ours != theirs and not force:
            raise RegistryError(
                f"{name} version {target.version} was evaluated on other data than "
                f"{alias} version {current} ({EVAL_MD5} {ours or 'missing'} vs "
                f"{theirs or 'missing'}): their losses are not comparable; pass --force "
                "to move it anyway"
            )
        if ours != theirs:
            reason = f"{reason} (--force: eval data {ours or 'missing'} vs {theirs or 'missing'})"
    return move_alias(
        client, name, alias, str(target.version), kind=kind, reason=reason, numbers=numbers
    )


def _losses(version: ModelVersion, key: str) -> dict[str, float]:
    loss = version.tags.get(EVAL_LOSS)
    return {} if loss is None else {key: float(loss)}


def registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model named {name!r}") from None
        raise


def model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    registered_model(client, name)  # names a missing model rather than a missing version
    if not version.isdigit():
        raise RegistryError(f"version {version!r} of {name}: a version is a number, e.g. 3")
    try:
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {version}") from None
        raise


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version name@alias points at, None while it points nowhere."""
    version = registered_model(client, name).aliases.get(alias)
    return None if version is None else str(version)


def _event(
    kind: str,
    alias: str,
    previous: str | None,
    version: str,
    reason: str,
    numbers: dict[str, float],
    *,
    moved: bool,
) -> AliasEvent:
    return AliasEvent(
        at=datetime.now(UTC).isoformat(timespec="microseconds"),
        who=os_user(),
        kind=kind,
        alias=alias,
        from_version=previous,
        to_version=str(version),
        reason=reason,
        numbers=numbers,
        moved=moved,
    )
