"""Ingestion: read a training pool and an eval split from files or the hub into one schema.

Output schema (Parquet, one file per split): id (the user's own id, data.id_field, else the
content hash of prompt and response), prompt, response, source, split. Beside each staged
table, a second Parquet holds what validation needs and the data must not carry: each row's
source place (file and 1-based line or record) and content hash.
Sources are streamed batch by batch (steps/data/readers.py) and written row group by row
group, so a file of any size is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from steps.data.fields import (
    AUTO_ID,
    chat_renderer,
    column_values,
    content_id,
    empty_prompt,
    field_columns,
    id_column,
    user_ids,
)
from steps.data.local_files import LOCAL_SUFFIXES, all_files, local_files
from steps.data.readers import Batch, IngestError, iter_hub, iter_local
from steps.hashing import file_md5
from steps.paths import PathOutsideRoots, inside_roots, resolved_roots

__all__ = [
    "SCHEMA",
    "IngestConfig",
    "IngestError",
    "IngestResult",
    "StagedRows",
    "TableRef",
    "content_id",
    "ingest",
]

SCHEMA = ["id", "prompt", "response", "source", "split"]
ARROW_SCHEMA = pa.schema([(name, pa.string()) for name in SCHEMA])
PLACES_SCHEMA = pa.schema([("place", pa.string()), ("content_id", pa.string())])


class IngestConfig(BaseModel):
    """Where the data comes from and which fields hold prompt and response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A file (.jsonl/.json/.csv/.parquet/.txt, text ones optionally .gz/.bz2/.xz/.zst), a
    # folder of such files and nothing else (see steps/data/local_files.py), or a hub id.
    source: str = "assets/data/gsm8k/train.jsonl"
    # Held-out split for evaluation: a file/folder/hub id; a hub id uses eval_split.
    eval_source: str = "assets/data/gsm8k/test.jsonl"
    split: str = "train"
    eval_split: str = "test"
    revision: str | None = None  # hub datasets only: pin a commit for reproducibility
    # auto: local paths are read by Sift's streaming readers, anything else is a hub id.
    # datasets: always `datasets.load_dataset(source, split, revision)`, e.g. for a local
    # clone of a hub dataset repo (a folder with train/test files or a loading config).
    loader: Literal["auto", "datasets"] = "auto"
    # A column name, or a template over columns such as "{instruction}\n{input}".
    prompt_field: str = "question"
    response_field: str = "answer"
    # Plain LM data: this column becomes the response and the prompt is empty. A .txt file
    # always reads as one `text` column per non-blank line.
    text_field: str | None = None
    # The column holding the user's own example ids, which then name the examples in
    # selection.json, MLflow and validation messages (they must be unique and non-empty).
    # "auto": the column `id` when the source has one, else none; null: none. Without ids,
    # an example's id is the content hash of prompt + response (the dedup key either way).
    id_field: str | None = AUTO_ID
    # Render each prompt with this tokenizer's chat template (hub id or local folder): one
    # user turn plus the assistant-turn opener. Pair it with model.prompt_template "{prompt}"
    # so that no second template wraps it. None keeps prompts as they are.
    chat_template: str | None = None
    # Every local path a run reads must resolve (symlinks followed) inside one of these
    # folders: data and eval sources and every file in a folder source, model.name and
    # data.chat_template folders, select.target, finetune.accelerate_config, eval.suite /
    # data_dir / include_path and what their YAMLs name, study.results_dir (flows/config.py
    # check_paths). Relative entries are relative to the project; hub ids are not paths.
    # Stops `../../etc/passwd`-style paths in configs and links to them in data folders.
    allowed_roots: tuple[str, ...] = (".", "assets")
    # Cap on pool / eval rows (first rows in file order); None keeps all. Small caps make fast runs.
    limit: int | None = Field(default=None, gt=0)
    eval_limit: int | None = Field(default=400, gt=0)


@dataclass(frozen=True)
class StagedRows:
    """What ingest knows about a staged table that its published bytes must not carry."""

    places_path: str  # Parquet, a row per table row: source place ("a.jsonl line 7"), content hash
    # What a prompt is when every prompt field is empty (template and chat text only);
    # None where prompts may be empty by design (plain LM data: data.text_field).
    empty_prompt: str | None


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


def resolve_local(source: str, project_dir: Path) -> Path | None:
    """A local path (relative to the project) if the source names one; None for a hub id."""
    path = Path(source)
    path = path if path.is_absolute() else project_dir / path
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/")):
        raise IngestError(f"data source not found: {path}")
    return None


def allowed_roots(config: IngestConfig, project_dir: Path) -> list[Path]:
    """data.allowed_roots, resolved (relative entries from the project)."""
    return resolved_roots(config.allowed_roots, project_dir)


def check_allowed(path: Path, setting: str, config: IngestConfig, project_dir: Path) -> Path:
    """The resolved path, if it lies inside data.allowed_roots; an error naming both if not."""
    try:
        return inside_roots(path, allowed_roots(config, project_dir), setting)
    except PathOutsideRoots as error:
        raise IngestError(str(error)) from None


def check_files(path: Path, roots: Sequence[Path], setting: str, config: IngestConfig) -> None:
    """Every file a local source would be read from resolves inside `roots` (and, for Sift's
    readers, is a data file): what `datasets` reads of a folder is checked too."""
    if config.loader == "auto":
        local_files(path, roots, setting)
    else:
        all_files(path, roots, setting)


def _looks_local(source: str) -> bool:
    path = Path(source)
    return source.startswith((".", "/", "~")) or ".." in path.parts or path.suffix in LOCAL_SUFFIXES


def _local_source(source: str, setting: str, config: IngestConfig, project_dir: Path):
    """The resolved local path of a source, or None for a hub dataset id. It, and each file
    of a folder, is checked against data.allowed_roots before any read."""
    path = Path(source) if Path(source).is_absolute() else project_dir / source
    if path.exists() or _looks_local(source):
        check_allowed(path, setting, config, project_dir)
        if not path.exists():
            raise IngestError(f"{setting} not found: {path} (relative paths start at the project)")
    if config.loader == "datasets" and not path.exists():
        return None
    local = resolve_local(source, project_dir)
    if local is None:
        return None
    check_files(local.resolve(), allowed_roots(config, project_dir), setting, config)
    return local.resolve()


def sources_fingerprint(config: IngestConfig, project_dir: Path) -> str:
    """A content hash of the local sources (after the allowed-roots check), or the hub ids.

    The flow passes this into the cached ingest task, so editing a file in place
    invalidates the cache.
    """
    parts = []
    for setting, source in (
        ("data.source", config.source),
        ("data.eval_source", config.eval_source),
    ):
        _local_source(source, setting, config, project_dir)
        parts.append(source_fingerprint(source, project_dir, config, setting))
    return "".join(parts)


def source_fingerprint(
    source: str,
    project_dir: Path,
    config: IngestConfig | None = None,
    setting: str = "data.source",
) -> str:
    """A content hash of one local source (file or folder), or the id itself for hub datasets.

    Only files that the read would take are hashed, each checked against data.allowed_roots
    first (config's, else the defaults): a link in a data folder to /etc/passwd is refused,
    never hashed."""
    config = config or IngestConfig()
    path = resolve_local(source, project_dir)
    if path is None:
        return f"hub:{source}"
    roots = allowed_roots(config, project_dir)
    if config.loader == "auto":
        named = [(file.name or path.name, file.path) for file in local_files(path, roots, setting)]
    else:
        named = [(p.name, p) for p in all_files(path, roots, setting)]
    return hashlib.md5("".join(f"{name}:{file_md5(p)}" for name, p in named).encode()).hexdigest()


def read_source(
    source: str,
    split: str,
    revision: str | None,
    project_dir: Path,
    config: IngestConfig | None = None,
) -> pd.DataFrame:
    """A whole local file/folder or hub split as one DataFrame (for small inputs only;
    `ingest` streams). Local files are checked against config's data.allowed_roots (else
    the defaults)."""
    path = resolve_local(source, project_dir)
    roots = allowed_roots(config or IngestConfig(), project_dir)
    batches = (
        iter_local(path, roots, "data.source")
        if path is not None
        else iter_hub(source, split, revision)
    )
    frames = [batch.frame for batch in batches]
    if not frames or sum(len(f) for f in frames) == 0:
        raise IngestError(f"{path or source}: no records")
    return pd.concat(frames, ignore_index=True)


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
) -> _Normalised:
    text_field = config.text_field
    if text_field is None and list(batch.frame.columns) == ["text"]:
        text_field = "text"  # a .txt file, or a one-column text dataset
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
    path = _local_source(source, setting, config, project_dir)
    return open_batches(path, source, split, config, allowed_roots(config, project_dir), setting)


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


def stream_table(
    batches: Iterator[Batch],
    config: IngestConfig,
    label: str,
    split: str,
    limit: int | None,
    path: Path,
    places_path: Path | None = None,
) -> tuple[int, str | None]:
    """Normalises batches into one Parquet file, a row group per batch; returns the rows
    written and the table's empty prompt (see StagedRows). With `places_path`, each row's
    source place and content hash go to that file alongside."""
    rows, plain = 0, False
    render = chat_renderer(config.chat_template)
    targets = [path] if places_path is None else [path, places_path]
    # No half-written tables, and a name of this call's own: two runs staging the same
    # sources at once each write their own file, then replace the table atomically.
    partials = [target.with_suffix(f".{uuid.uuid4().hex[:12]}.partial") for target in targets]
    try:
        with (
            pq.ParquetWriter(partials[0], ARROW_SCHEMA, compression="zstd") as writer,
            _places_writer(partials[1:]) as places,
        ):
            for batch in batches:
                done = _normalise(batch, config, label, split, render)
                keep = len(done.table) if limit is None else limit - rows
                arrow = pa.Table.from_pandas(
                    done.table.head(keep), ARROW_SCHEMA, preserve_index=False
                )
                writer.write_table(arrow.replace_schema_metadata(None))
                if places is not None:
                    where = [f"{label} {place}" for place in batch.where[:keep]]
                    columns = {"place": where, "content_id": done.content_ids[:keep]}
                    places.write_table(pa.table(columns, schema=PLACES_SCHEMA))
                rows += arrow.num_rows
                plain = plain or (done.plain and arrow.num_rows > 0)
                if limit is not None and rows >= limit:
                    break
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    if rows == 0:
        for partial in partials:
            partial.unlink()
        raise IngestError(f"{label}: no records")
    for partial, target in zip(partials, targets, strict=True):
        partial.replace(target)
    # A folder mixing plain-text and prompt/response files keeps empty prompts legal.
    return rows, None if plain else empty_prompt(config.prompt_field, render)


@contextmanager
def _places_writer(paths: list[Path]) -> Iterator[pq.ParquetWriter | None]:
    if not paths:
        yield None
        return
    with pq.ParquetWriter(paths[0], PLACES_SCHEMA, compression="zstd") as writer:
        yield writer


def ingest(config: IngestConfig, project_dir: Path, staging_dir: Path) -> IngestResult:
    """Reads pool and eval split, normalises both and stages them as {train,eval}.parquet.

    Staged tables reach the DVC-tracked data/ folder only through validation.
    """
    sources = (
        ("train", "data.source", config.source, config.split, config.limit),
        ("eval", "data.eval_source", config.eval_source, config.eval_split, config.eval_limit),
    )
    for _, setting, source, _, _ in sources:  # every path checked before anything is read
        _local_source(source, setting, config, project_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    refs = {}
    for name, setting, source, split, limit in sources:
        batches = _batches(source, setting, split, config, project_dir)
        label = source_label(source, project_dir)
        path, places = staging_dir / f"{name}.parquet", staging_dir / f"{name}.places.parquet"
        rows, empty = stream_table(batches, config, label, name, limit, path, places)
        staged = StagedRows(places_path=str(places), empty_prompt=empty)
        refs[name] = TableRef(path=str(path), rows=rows, md5=file_md5(path), staged=staged)
    return IngestResult(train=refs["train"], eval=refs["eval"])
