"""Ingestion: read a training pool and an eval split from files or the hub into one schema.

Output schema (Parquet, one file per split): id (the user's own id, data.id_field, else the
content hash of prompt and response), prompt, response, source, split. Beside each staged
table, a second Parquet holds what validation needs and the data must not carry: each row's
source place (file and 1-based line or record) and content hash.
Conversations (data.format messages or sharegpt, or what auto finds) are staged in a schema
of their own (steps/data/conversation_ingest.py): one source is of one kind or the other.
Sources are streamed batch by batch (steps/data/readers.py) and written row group by row
group, so a file of any size is never held in memory whole.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steps.data.conversation_config import ConversationFormat
from steps.data.conversation_ingest import (
    CONVERSATION_ARROW_SCHEMA,
    CONVERSATION_FORMATS,
    CONVERSATION_PLACES_SCHEMA,
    batch_format,
    stage_conversations,
)
from steps.data.fields import (
    chat_renderer,
    column_values,
    content_id,
    empty_prompt,
    field_columns,
    id_column,
    user_ids,
)
from steps.data.ingest_config import IngestConfig
from steps.data.readers import Batch, IngestError, iter_hub, iter_local
from steps.data.sources import allowed_roots, check_files, local_source, resolve_local
from steps.hashing import file_md5

__all__ = [
    "SCHEMA",
    "IngestConfig",
    "IngestError",
    "IngestResult",
    "StagedRows",
    "Streamed",
    "TableRef",
    "content_id",
    "format_lines",
    "ingest",
    "named_source_batches",
]

SCHEMA = ["id", "prompt", "response", "source", "split"]
ARROW_SCHEMA = pa.schema([(name, pa.string()) for name in SCHEMA])
PLACES_SCHEMA = pa.schema([("place", pa.string()), ("content_id", pa.string())])


@dataclass(frozen=True)
class StagedRows:
    """What ingest knows about a staged table that its published bytes must not carry."""

    places_path: str  # Parquet, a row per table row: source place ("a.jsonl line 7"), content hash
    # What a prompt is when every prompt field is empty (template and chat text only);
    # None where prompts may be empty by design (plain LM data: data.text_field), and for
    # conversations.
    empty_prompt: str | None
    formats: tuple[str, ...] = ()  # how data.format auto read the source, for the run's log


@dataclass(frozen=True)
class TableRef:
    """A Parquet table written by ingest: its path, row count and content md5."""

    path: str
    rows: int
    md5: str
    staged: StagedRows | None = None  # staged tables only: read by validation, never published


def table_ref(path: Path) -> TableRef:
    """A Parquet table on disk as a TableRef: rows from its footer, md5 of its bytes."""
    return TableRef(str(path), pq.ParquetFile(path).metadata.num_rows, file_md5(path))


@dataclass(frozen=True)
class IngestResult:
    train: TableRef
    eval: TableRef


def format_lines(result: IngestResult) -> list[str]:
    """How data.format auto read each staged source ("raw/chat.jsonl: data.format auto:
    messages (columns ['messages'])"), for the run's log."""
    tables = (result.train, result.eval)
    return [line for table in tables if table.staged for line in table.staged.formats]


def source_label(source: str, project_dir: Path) -> str:
    """The source as recorded in the data: project-relative, so that the same data ingested
    from two checkouts gives byte-identical files and the same DVC md5."""
    path = Path(source)
    if path.is_absolute() and path.is_relative_to(project_dir.resolve()):
        return str(path.relative_to(project_dir.resolve()))
    return source


@dataclass(frozen=True)
class _Normalised:
    table: pd.DataFrame
    content_ids: list[str]
    plain: bool  # plain LM rows: the prompt is empty by design


def _normalise(
    batch: Batch,
    config: IngestConfig,
    source: str,
    split: str,
    render: Callable[[str], str] | None,
    text: bool | None = None,
) -> _Normalised:
    """`text`: the batch is plain LM data (data.format text); None: as its columns say."""
    if text is None:
        text = config.text_field is not None or list(batch.frame.columns) == ["text"]
    # data.text_field, else a .txt file's or a one-column text dataset's `text`
    text_field = (config.text_field or "text") if text else None
    if text_field is not None:
        responses = column_values(batch, "data.text_field", text_field, source)
        prompts: list[str | None] = [""] * len(responses)
    else:
        fields = [config.prompt_field, config.response_field]
        wanted = [c for f in fields for c in field_columns(f)]
        missing = [c for c in dict.fromkeys(wanted) if c not in batch.frame.columns]
        if missing:
            raise IngestError(
                f"{source}: missing field(s) {missing} (data.prompt_field = "
                f"{config.prompt_field!r}, data.response_field = {config.response_field!r}); "
                f"columns present: {list(batch.frame.columns)}"
            )
        prompts = column_values(batch, "data.prompt_field", config.prompt_field, source)
        responses = column_values(batch, "data.response_field", config.response_field, source)
        if render is not None:
            prompts = [None if p is None else render(p) for p in prompts]
    hashes = [content_id(str(p), str(r)) for p, r in zip(prompts, responses, strict=True)]
    column = id_column(batch, config.id_field, source)
    table = pd.DataFrame(
        {
            "id": hashes if column is None else user_ids(batch, column, source),
            "prompt": prompts,
            "response": responses,
            "source": source,
            "split": split,
        },
        columns=SCHEMA,
    )
    return _Normalised(table, hashes, plain=text_field is not None)


def normalise_batch(
    batch: Batch,
    config: IngestConfig,
    source: str,
    split: str,
    render: Callable[[str], str] | None = None,
) -> pd.DataFrame:
    """Maps configured fields onto the schema; plain-text data becomes prompt '' + response text.

    `render` (see chat_renderer) rewrites each non-null prompt before the id is computed."""
    return _normalise(batch, config, source, split, render).table


def normalise(frame: pd.DataFrame, config: IngestConfig, source: str, split: str) -> pd.DataFrame:
    """normalise_batch for a whole in-memory frame (records numbered from 1)."""
    return normalise_batch(
        Batch(frame, [f"record {i}" for i in range(1, len(frame) + 1)]), config, source, split
    )


def write_table(table: pd.DataFrame, path: Path) -> None:
    # No pandas index and a fixed writer: identical inputs give byte-identical files.
    table.to_parquet(path, index=False, engine="pyarrow", compression="zstd")


def _batches(source: str, setting: str, split: str, config: IngestConfig, project_dir: Path):
    path = local_source(source, setting, config, project_dir)
    return open_batches(path, source, split, config, allowed_roots(config, project_dir), setting)


def named_source_batches(data: IngestConfig, project_dir: Path) -> Iterator[Batch]:
    """data.source read as ingest reads it. The path itself may lie outside data.allowed_roots
    (`sift select --data` reads what its user named), but what a named folder holds must
    resolve inside that folder or data.allowed_roots: a link in it to ~/.ssh is not data."""
    path = resolve_local(data.source, project_dir)
    roots = allowed_roots(data, project_dir) + ([path.resolve()] if path is not None else [])
    return open_batches(path, data.source, data.split, data, roots, "data.source")

def open_batches(
    path: Path | None,
    source: str,
    split: str,
    config: IngestConfig,
    roots: Sequence[Path],
    setting: str,
) -> Iterator[Batch]:
    """A source's batches: Sift's streaming readers for a local path (data.loader=auto),
    `datasets` for anything else (or for a local path with data.loader=datasets). Every
    local file is checked against `roots` (resolved) first; `setting` names it in errors."""
    if path is not None and config.loader == "auto":
        return iter_local(path, roots, setting)
    if path is not None:
        check_files(path, roots, setting, config)
    return iter_hub(str(path) if path is not None else source, split, config.revision)


@dataclass(frozen=True)
class Streamed:
    """What stream_table wrote."""

    rows: int
    empty_prompt: str | None  # see StagedRows
    formats: tuple[str, ...]  # how data.format auto read the source (detect_format), once each


@dataclass
class _Writers:
    """A staged table's writers, opened at its first batch: its kind (prompt/response or
    conversations) picks the schemas, and every later batch must be of that kind."""

    partials: list[Path]
    stack: ExitStack
    conversation: bool | None = None
    table: pq.ParquetWriter | None = None
    places: pq.ParquetWriter | None = None

    def open(self, conversation: bool, where: str) -> tuple[pq.ParquetWriter, pa.Schema]:
        """The table's writer and the places' schema, for a batch of this kind."""
        schemas = (
            (CONVERSATION_ARROW_SCHEMA, CONVERSATION_PLACES_SCHEMA)
            if conversation
            else (ARROW_SCHEMA, PLACES_SCHEMA)
        )
        if self.conversation is None:
            self.conversation = conversation
            writers = [
                self.stack.enter_context(pq.ParquetWriter(partial, schema, compression="zstd"))
                for partial, schema in zip(self.partials, schemas, strict=False)
            ]
            self.table, self.places = writers[0], (writers[1] if len(writers) > 1 else None)
        elif self.conversation != conversation:
            kinds = ("prompt/response rows", "conversations")
            raise IngestError(
                f"{where}: {kinds[conversation]} after {kinds[not conversation]}: a source "
                "holds one or the other (set data.format, or split the folder)"
            )
        assert self.table is not None
        return self.table, schemas[1]


@dataclass(frozen=True)
class _Staged:
    """One batch as staged rows, and its places columns but the place."""

    table: pd.DataFrame
    places: dict[str, list]  # content_id (and a conversation's findings)
    plain: bool = False  # see _Normalised


def _stage_batch(
    batch: Batch, config: IngestConfig, label: str, split: str, fmt: str, render
) -> _Staged:
    if fmt in CONVERSATION_FORMATS:
        conversation_format = cast(ConversationFormat, fmt)  # one of CONVERSATION_FORMATS
        staged = stage_conversations(batch, config, conversation_format, label, split)
        return _Staged(staged.table, {"content_id": staged.content_ids,
                                      "findings": staged.findings})  # fmt: skip
    done = _normalise(batch, config, label, split, render(), text=fmt == "text")
    return _Staged(done.table, {"content_id": done.content_ids}, done.plain)


def stream_table(
    batches: Iterator[Batch],
    config: IngestConfig,
    label: str,
    split: str,
    limit: int | None,
    path: Path,
    places_path: Path | None = None,
) -> Streamed:
    """Normalises batches into one Parquet file, a row group per batch, in its kind's schema:
    prompt/response rows (SCHEMA) or conversations (CONVERSATION_SCHEMA), as data.format
    reads each batch. With `places_path`, each row's source place and content hash (and a
    conversation's findings) go to that file alongside."""
    rows, plain, formats = 0, False, dict[str, str]()
    # data.chat_template's prompt renderer: loaded once, for prompt/response rows only (for
    # conversations the setting names the template they are encoded with, steps/encoding.py)
    render = functools.cache(lambda: chat_renderer(config.chat_template))

    targets = [path] if places_path is None else [path, places_path]
    # No half-written tables, and a name of this call's own: two runs staging the same
    # sources at once each write their own file, then replace the table atomically.
    partials = [target.with_suffix(f".{uuid.uuid4().hex[:12]}.partial") for target in targets]
    try:
        with ExitStack() as stack:
            writers = _Writers(partials, stack)
            for batch in batches:
                detected = batch_format(list(batch.frame.columns), config, label)
                formats.setdefault(detected.format, detected.message)
                conversation = detected.format in CONVERSATION_FORMATS
                where = f"{label} {batch.where[0]}" if batch.where else label
                writer, places_schema = writers.open(conversation, where)
                staged = _stage_batch(batch, config, label, split, detected.format, render)
                keep = len(staged.table) if limit is None else limit - rows
                schema = CONVERSATION_ARROW_SCHEMA if conversation else ARROW_SCHEMA
                arrow = pa.Table.from_pandas(staged.table.head(keep), schema, preserve_index=False)
                writer.write_table(arrow.replace_schema_metadata(None))
                if writers.places is not None:
                    places = {"place": [f"{label} {place}" for place in batch.where[:keep]]}
                    places |= {name: values[:keep] for name, values in staged.places.items()}
                    writers.places.write_table(pa.table(places, schema=places_schema))
                rows += arrow.num_rows
                plain = plain or (staged.plain and arrow.num_rows > 0)
                if limit is not None and rows >= limit:
                    break
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    if rows == 0:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise IngestError(f"{label}: no records")
    for partial, target in zip(partials, targets, strict=True):
        partial.replace(target)
    # auto says what it decided where that is news: a conversation or plain-text reading. A
    # prompt/response source reads as it always has (and as the docs' first example), so the
    # console keeps its one line per stage and `sift validate` its first line.
    messages = tuple(m for fmt, m in formats.items() if m and fmt != "prompt_response")
    if writers.conversation:
        return Streamed(rows, None, messages)
    # A folder mixing plain-text and prompt/response files keeps empty prompts legal.
    return Streamed(rows, None if plain else empty_prompt(config.prompt_field, render()), messages)


def ingest(config: IngestConfig, project_dir: Path, staging_dir: Path) -> IngestResult:
    """Reads pool and eval split, normalises both and stages them as {train,eval}.parquet.

    Staged tables reach the DVC-tracked data/ folder only through validation.
    """
    sources = (
        ("train", "data.source", config.source, config.split, config.limit),
        ("eval", "data.eval_source", config.eval_source, config.eval_split, config.eval_limit),
    )
    for _, setting, source, _, _ in sources:  # every path checked before anything is read
        local_source(source, setting, config, project_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    refs = {}
    for name, setting, source, split, limit in sources:
        batches = _batches(source, setting, split, config, project_dir)
        label = source_label(source, project_dir)
        path, places = staging_dir / f"{name}.parquet", staging_dir / f"{name}.places.parquet"
        streamed = stream_table(batches, config, label, name, limit, path, places)
        staged = StagedRows(str(places), streamed.empty_prompt, streamed.formats)
        refs[name] = TableRef(path=str(path), rows=streamed.rows, md5=file_md5(path), staged=staged)
    return IngestResult(train=refs["train"], eval=refs["eval"])
