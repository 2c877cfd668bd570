"""Export: the rows a selection picked, read from its source and written as a dataset another
trainer reads (TRL's `messages`, LLaMA-Factory's `sharegpt` or `alpaca`), with a data card.

The source is read as ingest and `sift select` read it (the same readers, field mapping,
data.limit and ids: data.id_field, else the content hash), so the selection's ids name its
rows; they go out in the selection's train_ids order (what Sift's fine-tuning trains on: a
warm start's earlier picks, then the new ones). Beside FILE: FILE.card.md (YAML front matter
then prose: selector, budget, objective, pool and selection md5s, Sift's version, the command)
and, for LLaMA-Factory's formats, dataset_info.json with this file's entry added. Every file
is written under a private name and renamed into place once all are written: an error leaves
nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import cast

import yaml

from steps.data.batch import Batch
from steps.data.conversation_config import ConversationConfig, ConversationFormat, DataFormat
from steps.data.conversation_formats import (
    conversation_columns,
    detect_format,
    read_conversations,
)
from steps.data.conversations import Conversation, Turn, conversation_id
from steps.data.fields import chat_renderer, id_column, user_ids
from steps.data.ingest import (
    IngestConfig,
    named_source_batches,
    normalise_batch,
    source_label,
)
from steps.data.local_files import IngestError, local_files
from steps.data.sources import allowed_roots, check_allowed, resolve_local
from steps.export_formats import (
    EXPORT_FORMATS,
    ExportError,
    ExportFormat,
    SelectedRow,
    export_records,
    plain_value,
)
from steps.hashing import file_md5
from steps.paths import private_partial
from steps.selection.record import SelectionRecord

__all__ = [
    "ExportError",
    "ExportResult",
    "SelectionSource",
    "check_destination",
    "export_selection",
    "read_selected",
]

SHOWN_IDS = 5  # missing ids named in the error; the rest are counted


@dataclass(frozen=True)
class SelectionSource:
    """A selection and where it came from."""

    record: SelectionRecord
    label: str  # the selection.json path, or "MLflow run <id>"
    md5: str  # of the selection.json bytes
    run_id: str | None = None
    run_pool_md5: str | None = None  # the run's dvc.train_md5: the validated pool it picked from


@dataclass(frozen=True)
class ExportResult:
    path: Path
    card_path: Path
    dataset_info_path: Path | None  # LLaMA-Factory's formats only
    rows: int
    pool_rows: int
    kept_source_records: bool  # conversation rows written as the source has them


def check_destination(
    fmt: str, out: Path, data: IngestConfig, project_dir: Path, setting: str = "--out"
) -> tuple[ExportFormat, Path]:
    """The format, and `out` resolved inside data.allowed_roots: checked before anything is
    read (`sift select --export` checks them before it selects)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    try:
        target = check_allowed(out, setting, data, project_dir)
    except IngestError as error:
        raise ExportError(str(error)) from None
    if target.is_dir():
        raise ExportError(f"{setting} {out} is a folder; name the file to write")
    if target.name == "dataset_info.json":  # written beside the file for LLaMA-Factory
        raise ExportError(f"{setting} {out}: dataset_info.json is the index; name the data file")
    return cast(ExportFormat, fmt), target


def _prompt_response_rows(
    batch: Batch,
    data: IngestConfig,
    label: str,
    wanted: set[str],
    render: Callable[[str], str] | None,
) -> Iterator[SelectedRow]:
    # Ids as ingest makes them (a chat-rendered prompt is hashed); contents as the source
    # has them, since the trainer that reads the export applies its own template.
    ids = normalise_batch(batch, data, label, "train", render)["id"].tolist()
    plain = normalise_batch(batch, data, label, "train")
    for index, row_id in enumerate(ids):
        if row_id not in wanted:
            continue
        prompt, response = plain["prompt"][index], plain["response"][index]
        place = f"{label} {batch.where[index]}"
        if prompt is None or response is None:
            raise ExportError(
                f"{place} (id {row_id}): a selected row with a null prompt or response"
            )
        turns = (Turn("user", prompt), Turn("assistant", response))
        yield SelectedRow(row_id, place, Conversation(turns), None, None)


def _conversation_rows(
    batch: Batch,
    data: IngestConfig,
    fmt: ConversationFormat,
    conversation: ConversationConfig,
    label: str,
    wanted: set[str],
) -> Iterator[SelectedRow]:
    columns = conversation_columns(list(batch.frame.columns), fmt, conversation, label)
    reads = read_conversations(batch, columns, conversation.tags, label)
    column = id_column(batch, data.id_field, label)
    named = user_ids(batch, column, label) if column is not None else None
    for index, read in enumerate(reads):
        if named is not None:
            row_id = named[index]
        else:  # unreadable rows have no hash: no selection can name them
            row_id = None if read.conversation is None else conversation_id(read.conversation)
        if row_id is None or row_id not in wanted:
            continue
        place = f"{label} {batch.where[index]}"
        if read.conversation is None:  # a user id names a row with no canonical form
            problem = read.findings[0].line() if read.findings else "unreadable"
            raise ExportError(f"selected id {row_id}: {problem}")
        record = {
            str(key): value
            for key, value in plain_value(batch.frame.iloc[index].to_dict()).items()
            if value is not None  # null, or a key this row lacks (pandas fills it in)
        }
        yield SelectedRow(row_id, place, read.conversation, record, columns)


def read_selected(
    data: IngestConfig,
    wanted: set[str],
    project_dir: Path,
    data_format: DataFormat = "auto",
    conversation: ConversationConfig | None = None,
) -> tuple[dict[str, SelectedRow], int]:
    """The source's rows whose ids are `wanted` (the first row of each id), and the rows read
    (up to data.limit). data_format and conversation: data.format and data.conversation."""
    conversation = conversation or ConversationConfig()
    label = source_label(data.source, project_dir)  # rows named as ingest names them
    # data.chat_template renders prompt/response prompts: loaded once, at the first such batch
    # (for conversations it names the template that encodes them, nothing to render here)
    render = functools.cache(lambda: chat_renderer(data.chat_template))  # as ingest does
    found: dict[str, SelectedRow] = {}
    rows = 0
    for batch in named_source_batches(data, project_dir):
        keep = len(batch.frame) if data.limit is None else min(len(batch.frame), data.limit - rows)
        batch = Batch(batch.frame.head(keep), batch.where[:keep])
        columns = list(batch.frame.columns)
        fmt = detect_format(columns, data, data_format, conversation, label).format
        if fmt == "text":
            raise ExportError(
                f"{label}: plain-text rows (data.text_field) have no prompt and reply "
                "to export as a conversation"
            )
        if fmt == "prompt_response":
            read = _prompt_response_rows(batch, data, label, wanted, render())
        else:
            layout = cast(ConversationFormat, fmt)  # detect_format's other two formats
            read = _conversation_rows(batch, data, layout, conversation, label, wanted)
        for row in read:
            found.setdefault(row.id, row)
        rows += keep
        if data.limit is not None and rows >= data.limit:
            break
    return found, rows


def _ordered(found: dict[str, SelectedRow], ids: Sequence[str], source: str) -> list[SelectedRow]:
    missing = [i for i in ids if i not in found]
    if missing:
        shown = ", ".join(missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
        raise ExportError(
            f"{len(missing)} of the selection's {len(ids)} ids are not in {source} ({shown}): "
            "export reads the data the selection was made from, with the same data.prompt_field, "
            "data.response_field, data.id_field, data.chat_template and data.limit"
        )
    return [found[i] for i in ids]


def source_md5(data: IngestConfig, project_dir: Path) -> str | None:
    """md5 of the source file (md5sum's), of its files' names and md5s for a folder; None
    for a hub dataset."""
    path = resolve_local(data.source, project_dir)
    if path is None:
        return None
    if path.is_file():
        return file_md5(path)
    roots = [*allowed_roots(data, project_dir), path.resolve()]
    files = local_files(path, roots, "data.source")
    return hashlib.md5("".join(f"{f.name}:{file_md5(f.path)}" for f in files).encode()).hexdigest()


def card_text(facts: dict[str, object], title: str, command: str) -> str:
    """The data card: the facts as YAML front matter (what a script reads), then prose."""
    front = yaml.safe_dump(facts, sort_keys=False, allow_unicode=True)
    return (
        f"---\n{front}---\n\n# {title}\n\nRow k of `{facts['file']}` is the selection's "
        f"train_ids[k]: {facts['selected_rows']} of {facts['pool_rows']} pool rows, picked by "
        f"{facts['selector']} (budget {facts['budget']} {facts['budget_kind']}, final "
        f"objective {facts['objective']}).\n\nWritten by:\n\n```\n{command}\n```\n"
    )


def _merged_dataset_info(path: Path, name: str, entry: dict[str, object]) -> str:
    """dataset_info.json with this export's entry added (or replaced), the others kept."""
    entries: dict[str, object] = {}
    if path.exists():
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ExportError(f"{path}: not valid JSON ({error}); fix or move it") from None
        if not isinstance(entries, dict):
            raise ExportError(f"{path}: not a JSON object of datasets; fix or move it")
    entries[name] = entry
    return json.dumps(entries, ensure_ascii=False, indent=2) + "\n"


def _write_all(texts: dict[Path, str]) -> None:
    """Each text under a private name, then each renamed into place: all or none."""
    partials = {path: private_partial(path) for path in texts}
    try:
        for path, text in texts.items():
            partials[path].write_text(text, encoding="utf-8")
    except BaseException:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        raise
    for path, partial in partials.items():
        os.replace(partial, path)


def export_selection(
    selection: SelectionSource,
    data: IngestConfig,
    fmt: str,
    out: Path,
    *,
    project_dir: Path,
    command: str,
    data_format: DataFormat = "auto",
    conversation: ConversationConfig | None = None,
    setting: str = "--out",
) -> ExportResult:
    """The selection's rows of data.source written to `out` in `fmt`, with the card (and
    dataset_info.json) beside it. `out` must lie in data.allowed_roots; `command` is what the
    card records as the command that wrote it; `setting` names `out` in errors."""
    checked, target = check_destination(fmt, out, data, project_dir, setting)
    conversation = conversation or ConversationConfig()
    ids = selection.record.train_ids
    found, pool_rows = read_selected(data, set(ids), project_dir, data_format, conversation)
    rows = _ordered(found, ids, source_label(data.source, project_dir))
    source = resolve_local(data.source, project_dir)
    if source is not None and target.is_relative_to(source.resolve()):
        raise ExportError(f"{setting} {out} lies in the data it is read from ({data.source})")
    exported = export_records(rows, checked, target.name, conversation.tags)
    if checked == "messages":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in exported.records)
    else:
        text = json.dumps(exported.records, ensure_ascii=False, indent=2) + "\n"
    record = selection.record
    facts: dict[str, object] = {
        "file": target.name,
        "format": checked,
        "selected_rows": len(rows),
        "new_picks": len(record.ids),
        "pool_rows": pool_rows,
        "selector": record.selector,
        "budget": record.budget,
        "budget_kind": record.budget_kind,
        "objective": record.final_objective,
        "source": source_label(data.source, project_dir),  # project-relative, as ingest's
        "pool_md5": source_md5(data, project_dir),
        "selection": selection.label,
        "selection_md5": selection.md5,
        "run_id": selection.run_id,
        "run_pool_md5": selection.run_pool_md5,
        "rows_as_in_source": exported.kept,
        "sift_version": version("sift"),
    }
    card_path = target.with_name(target.name + ".card.md")
    title = f"Sift selection: {len(rows)} rows of {Path(data.source).name}"
    texts = {target: text, card_path: card_text(facts, title, command)}
    info_path = None
    if exported.dataset_info is not None:
        info_path = target.with_name("dataset_info.json")
        texts[info_path] = _merged_dataset_info(info_path, target.stem, exported.dataset_info)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_all(texts)
    return ExportResult(target, card_path, info_path, len(rows), pool_rows, exported.kept)
