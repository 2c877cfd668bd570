"""`sift export`: the rows a selection picked, written as a dataset another trainer reads (TRL's
`messages` JSONL, LLaMA-Factory's `sharegpt` or `alpaca` JSON with its dataset_info.json)."""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ConfigOption, SetOption, console, fail, resolve_config
from flows.cli.output import JsonOption, print_json
from flows.config import PipelineConfig
from steps.data.conversation_config import ConversationConfig, DataFormat
from steps.data.ingest_config import IngestConfig
from steps.export import ExportResult, SelectionSource

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id

FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        help="messages: JSONL of {messages: [{role, content}]} (TRL's conversational format); "
        "sharegpt: JSON of {conversations: [{from, value}]}; alpaca: JSON of {instruction, "
        "input, output} (LLaMA-Factory's, with a dataset_info.json entry beside the file).",
    ),
]

# `sift select --export`: the selection exported as it is written
ExportOption = Annotated[
    Path | None,
    typer.Option(
        help="Also write the selected rows to this file, as `sift export` does (its card "
        "and, for sharegpt and alpaca, dataset_info.json beside it)."
    ),
]
ExportFormatOption = Annotated[
    str, typer.Option(help="--export's format: messages | sharegpt | alpaca.")
]


def conversation_settings(data: IngestConfig) -> tuple[DataFormat, ConversationConfig]:
    """How a conversation source is read: data.format and data.conversation, as ingest reads
    it (so a selection's conversation ids are found)."""
    return data.format, data.conversation


def command_line(command: str, options: Sequence[tuple[str, object]], extra: list[str]) -> str:
    """The command as its user would type it, for the data card: options given, in order."""
    words = ["sift", command]
    for name, value in options:
        if value is not None:
            words += [name, str(value)]
    return shlex.join(words + extra)


def config_words(config: Path | None, sets: list[str] | None) -> list[str]:
    words = [] if config is None else ["--config", str(config)]
    for item in sets or []:
        words += ["--set", item]
    return words


def read_selection_source(
    selection: str, config: PipelineConfig, project_dir: Path, work_dir: Path
) -> SelectionSource:
    """--selection: a selection.json, or an MLflow run id of the config's store (its
    selection/selection.json artifact). ValueError naming --selection otherwise."""
    from steps import tracking
    from steps.hashing import file_md5
    from steps.selection.record import read_selection

    path = Path(selection)
    if path.is_file():
        return SelectionSource(read_selection(path, "--selection"), str(path), file_md5(path))
    if not RUN_ID.fullmatch(selection):
        raise ValueError(
            f"--selection {selection!r}: no such file, and not an MLflow run id (32 hex digits)"
        )
    from flows.runtime import use_recorded_servers

    use_recorded_servers(project_dir)  # the MLflow server of `sift server up`, when running
    uri = tracking.resolve_tracking_uri(config.tracking, project_dir)
    tracking.require_store(uri)  # reading a run must not create a store
    tracking.use_tracking(uri)
    local, tags = tracking.download_run_selection(selection, work_dir, "--selection")
    record = read_selection(local, f"--selection {selection}")
    label = f"MLflow run {selection}"
    return SelectionSource(record, label, file_md5(local), selection, tags.get("dvc.train_md5"))


def _shown(path: Path) -> str:
    """A written path as its user named it: relative to the working directory, where it is."""
    here = Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)


def export_lines(result: ExportResult, fmt: str) -> list[str]:
    lines = [
        f"{result.rows} rows of {result.pool_rows} ({fmt}) → {_shown(result.path)}; "
        f"data card {_shown(result.card_path)}"
    ]
    if result.dataset_info_path is not None:
        lines.append(
            f"LLaMA-Factory: dataset '{result.path.stem}' in {_shown(result.dataset_info_path)} "
            f"(dataset_dir: {_shown(result.path.parent)})"
        )
    return lines


def export_json(result: ExportResult, fmt: str) -> dict[str, object]:
    return {
        "rows": result.rows,
        "pool_rows": result.pool_rows,
        "format": fmt,
        "file": _shown(result.path),
        "card": _shown(result.card_path),
        "dataset_info": None
        if result.dataset_info_path is None
        else _shown(result.dataset_info_path),
        "rows_as_in_source": result.kept_source_records,
    }


def export_selected(
    selection_path: Path,
    data: IngestConfig,
    fmt: str,
    out: Path,
    project_dir: Path,
    command: str,
) -> ExportResult:
    """`sift select --export`: the selection just written, exported as `sift export` does."""
    from steps.export import export_selection
    from steps.hashing import file_md5
    from steps.selection.record import read_selection

    record = read_selection(selection_path, "--out")
    picked = SelectionSource(record, str(selection_path), file_md5(selection_path))
    data_format, conversation = conversation_settings(data)
    return export_selection(
        picked,
        data,
        fmt,
        out,
        project_dir=project_dir,
        command=command,
        data_format=data_format,
        conversation=conversation,
        setting="--export",
    )


def export_command(
    selection: Annotated[
        str,
        typer.Option(
            help="A selection.json (`sift select --out`, a pipeline run's selection/), or an "
            "MLflow run id of tracking.tracking_uri's store: its logged selection."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="The file to write, inside data.allowed_roots; FILE.card.md beside it, and "
            "for sharegpt and alpaca dataset_info.json (this file's entry added)."
        ),
    ],
    format_: FormatOption,
    data: Annotated[
        str | None,
        typer.Option(help="The data the selection was made from (default: data.source)."),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the rows a selection picked as a dataset any trainer reads, in the selection's
    order, read with the config's data section (the field mapping and ids `sift select`
    used). Conversation sources keep their records where the format is theirs. Paths are
    relative to the working directory, the project."""
    from steps.data.ingest import IngestError
    from steps.data.sources import local_source
    from steps.export import export_selection

    root = Path.cwd()
    overrides = [*(set_ or []), *([f"data.source={json.dumps(data)}"] if data else [])]
    resolved = resolve_config(config, overrides, root, check=False)  # reads data.source only
    data_format, conversation = conversation_settings(resolved.data)
    command = command_line(
        "export",
        [("--selection", selection), ("--data", data), ("--format", format_), ("--out", out)],
        config_words(config, set_),
    )
    try:
        if data is None:  # the config's source lies in data.allowed_roots; --data is chosen
            local_source(resolved.data.source, "data.source", resolved.data, root)
        with tempfile.TemporaryDirectory(prefix="sift-export-") as work:
            picked = read_selection_source(selection, resolved, root, Path(work))
            result = export_selection(
                picked,
                resolved.data,
                format_,
                out,
                project_dir=root,
                command=command,
                data_format=data_format,
                conversation=conversation,
            )
    except (ValueError, IngestError) as error:  # ExportError, a selection or source at fault
        raise fail(f"sift export: {error}", 2) from None
    if as_json:
        print_json(export_json(result, format_))
        return
    for line in export_lines(result, format_):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
    app.command("export")(export_command)
