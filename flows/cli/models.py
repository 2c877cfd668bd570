"""`sift models`, `sift promote`, `sift rollback`: versions and the champion, by hand."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from mlflow.tracking import MlflowClient

from flows.cli.common import ConfigOption, ProjectOption, SetOption, console, fail, load_project
from flows.cli.output import print_table
from steps.registry.aliases import (
    EVAL_LOSS,
    EVAL_MD5,
    AliasEvent,
    RegistryError,
    alias_version,
    history,
    promote_by_hand,
    registered_model,
    rollback,
)
from steps.registry.register import CHALLENGER, CHAMPION
from steps.tracking import require_store, resolve_tracking_uri, use_tracking

DATA_MD5 = "dvc.md5"  # the DVC md5 of data/ the version was trained on (flows/pipeline.py)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Move it even when its eval data (sift.eval_md5) differs from the champion's.",
    ),
]


def models_command(
    name: Annotated[
        str | None, typer.Argument(help="Registered model; omit to list every model.")
    ] = None,
    show_history: Annotated[
        bool, typer.Option("--history", help="Every alias decision, oldest first.")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Registered models and their champions; with a name, its versions (aliases, eval loss,
    data and eval md5 (12 characters; --json prints them whole), age, source run) or, with
    --history, every alias decision (time, who, auto|manual|rollback, move, why, losses)."""
    if show_history and name is None:
        raise fail("--history needs a model name: sift models <name> --history", 2)
    client = _client(config, set_, project_dir)
    try:
        if name is None:
            title, rows = "registered models", _model_rows(client)
        elif show_history:
            # JSON keeps each event whole (from/to, moved, numbers as numbers) for scripts
            to_row = asdict if as_json else _event_row
            title, rows = f"{name}: alias history", [to_row(e) for e in history(client, name)]
        else:
            title, rows = f"{name}: versions", _version_rows(client, name)
    except RegistryError as error:
        raise fail(error, 1) from None
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"{title}: none")
        return
    header = [column.replace("_", " ") for column in rows[0]]
    cells = [[_cell(column, value) for column, value in row.items()] for row in rows]
    print_table(cells, title, header=header)


def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model.")],
    version: Annotated[str, typer.Argument(help="Version to make the champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version and in history).")],
    force: ForceOption = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Move `champion` to a version by hand; records who, when, why and the previous one."""
    if not reason.strip():
        raise fail("--reason is empty: say why this version becomes the champion", 2)
    client = _client(config, set_, project_dir)
    from flows.registry_lock import RegistryLockError, registry_lock  # Prefect: after the env

    try:
        with registry_lock(name):  # never interleaved with a pipeline's champion gate
            event = promote_by_hand(client, name, version, CHAMPION, reason=reason, force=force)
    except (RegistryError, RegistryLockError) as error:
        raise fail(error, 1) from None
    if event is None:
        console.print(f"{name}@{CHAMPION} is already version {version}: nothing changed")
        return
    _print_move(name, event)


def rollback_command(
    name: Annotated[str, typer.Argument(help="Registered model.")],
    to: Annotated[
        str | None,
        typer.Option(help="Version to go back to (default: the champion before this one)."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (recorded with the rollback).")] = None,
    force: ForceOption = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Move `champion` back: to --to, or to the champion before the current one (from the
    audit history); each rollback walks one champion further back."""
    client = _client(config, set_, project_dir)
    from flows.registry_lock import RegistryLockError, registry_lock  # Prefect: after the env

    try:
        with registry_lock(name):  # never interleaved with a pipeline's champion gate
            event = rollback(client, name, CHAMPION, to=to, reason=reason, force=force)
    except (RegistryError, RegistryLockError) as error:
        raise fail(error, 1) from None
    _print_move(name, event)


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
    app.command("models")(models_command)
    app.command("promote")(promote_command)
    app.command("rollback")(rollback_command)


def _client(config: Path | None, overrides: list[str] | None, project_dir: Path) -> MlflowClient:
    """A client on the configured store; a SQLite store that does not exist is an error here
    (opening it would create an empty one, and there is nothing in it to show or move)."""
    resolved, root = load_project(config, overrides, project_dir, check=False)  # reads no paths
    uri = resolve_tracking_uri(resolved.tracking, root)
    try:
        require_store(uri)
    except ValueError as error:
        raise fail(error, 1) from None
    use_tracking(uri)
    return MlflowClient()


def _model_rows(client: MlflowClient) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for model in client.search_registered_models(order_by=["name ASC"]):
        champion = alias_version(client, model.name, CHAMPION)
        versions = client.search_model_versions(f"name='{model.name}'")
        loss = next((v.tags.get(EVAL_LOSS) for v in versions if str(v.version) == champion), None)
        rows.append(
            {
                "model": model.name,
                "versions": len(versions),
                "champion": champion,
                "champion_eval_loss": None if loss is None else float(loss),
                "challenger": alias_version(client, model.name, CHALLENGER),
                "updated": _utc(model.last_updated_timestamp),
            }
        )
    return rows


def _version_rows(client: MlflowClient, name: str) -> list[dict[str, object]]:
    # search_model_versions leaves a version's aliases empty; the registered model has them.
    aliases: dict[str, list[str]] = {}
    for alias, number in sorted(registered_model(client, name).aliases.items()):
        aliases.setdefault(str(number), []).append(alias)
    versions = client.search_model_versions(f"name='{name}'")
    rows: list[dict[str, object]] = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        loss = version.tags.get(EVAL_LOSS)
        rows.append(
            {
                "version": str(version.version),
                "aliases": ", ".join(aliases.get(str(version.version), [])),
                "eval_loss": None if loss is None else float(loss),
                "data_md5": version.tags.get(DATA_MD5),
                "eval_md5": version.tags.get(EVAL_MD5),
                "created": _utc(version.creation_timestamp),
                "age": _age(version.creation_timestamp),
                "source_run": version.run_id,
            }
        )
    return rows


def _event_row(event: AliasEvent) -> dict[str, object]:
    if event.moved:
        move = f"{event.from_version or 'none'} → {event.to_version}"
    else:  # the gate left the alias where it was: the candidate lost
        move = f"stays {event.from_version} ({event.to_version} not promoted)"
    return {
        "time": datetime.fromisoformat(event.at).strftime("%Y-%m-%d %H:%M:%SZ"),
        "who": event.who,
        "kind": event.kind,
        "alias": event.alias,
        "move": move,
        "reason": event.reason,
        "eval_loss_to_vs_from": _to_vs_from(event.numbers),
    }


def _to_vs_from(numbers: dict[str, float]) -> str:
    """The metric of the version moved to (or kept out) vs the one it was compared with; the
    gate also records its improvement, margin and stderr, which the reason column states."""
    for key, value in numbers.items():
        previous = numbers.get(f"previous_{key}")
        if previous is not None:
            return f"{value:.4f} vs {previous:.4f}"
    return " vs ".join(f"{v:.4f}" for v in numbers.values())  # a first version: one number


def _print_move(name: str, event: AliasEvent) -> None:
    console.print(
        f"{name}@{event.alias}: version {event.from_version or 'none'} → {event.to_version} "
        f"({event.kind}, by {event.who} at {event.at}): {event.reason}",
        markup=False,
        highlight=False,
    )


def _cell(column: str, value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if column.endswith("_md5"):
        return str(value)[
            :12
        ]  # like a short git SHA: enough to tell versions apart; --json has all
    return str(value)


def _utc(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    seconds = max(0, int(datetime.now(UTC).timestamp() - timestamp_ms / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
