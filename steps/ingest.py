"""Ingestion: read a training pool and an eval split from files or the hub into one schema.

Output schema (Parquet, one file per split): id (content hash), prompt, response, source, split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

SCHEMA = ["id", "prompt", "response", "source", "split"]
LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}


class IngestConfig(BaseModel):
    """Where the data comes from and which fields hold prompt and response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A file (.jsonl/.json/.csv/.parquet/.txt), a folder of such files, or a hub dataset id.
    source: str = "assets/data/gsm8k/train.jsonl"
    # Held-out split for evaluation: a file/folder/hub id; a hub id uses eval_split.
    eval_source: str = "assets/data/gsm8k/test.jsonl"
    split: str = "train"
    eval_split: str = "test"
    revision: str | None = None  # hub datasets only: pin a commit for reproducibility
    prompt_field: str = "question"
    response_field: str = "answer"
    # Cap on pool / eval rows (first rows in file order); None keeps all. Small caps make fast runs.
    limit: int | None = Field(default=None, gt=0)
    eval_limit: int | None = Field(default=400, gt=0)


@dataclass(frozen=True)
class TableRef:
    """A Parquet table written by ingest: its path, row count and content md5."""

    path: str
    rows: int
    md5: str


@dataclass(frozen=True)
class IngestResult:
    train: TableRef
    eval: TableRef


class IngestError(ValueError):
    """Raised for unreadable or ill-formed input; the message names the file, line or field."""


def file_md5(path: Path) -> str:
    """md5 of a file's bytes, read in chunks (the same digest DVC records per file)."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: str, project_dir: Path) -> str:
    """A content hash of a local source (file or folder), or the id itself for hub datasets.

    The flow passes this into cached tasks, so editing a file in place invalidates the cache.
    """
    path = resolve_local(source, project_dir)
    if path is None:
        return f"hub:{source}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.md5("".join(f"{p.name}:{file_md5(p)}" for p in files).encode()).hexdigest()


def resolve_local(source: str, project_dir: Path) -> Path | None:
    """A local path (relative to the project) if the source names one; None for a hub id."""
    path = Path(source)
    path = path if path.is_absolute() else project_dir / path
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/")):
        raise IngestError(f"data source not found: {path}")
    return None


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise IngestError(
                    f"{path}: line {number} is not valid JSON ({error.msg})"
                ) from None
            if not isinstance(record, dict):
                raise IngestError(f"{path}: line {number} is not a JSON object")
            yield record


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return pd.DataFrame.from_records(list(_iter_jsonl(path)))
        if suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            return pd.DataFrame.from_records(records)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".txt":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return pd.DataFrame({"text": lines})
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}: not valid UTF-8 at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise IngestError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    raise IngestError(
        f"{path}: unsupported format '{suffix}' (use one of {sorted(LOCAL_SUFFIXES)})"
    )


def read_source(source: str, split: str, revision: str | None, project_dir: Path) -> pd.DataFrame:
    """Reads a local file/folder with pandas, or a hub dataset through `datasets.load_dataset`."""
    path = resolve_local(source, project_dir)
    if path is None:
        from datasets import load_dataset  # heavy import, only for hub sources

        return load_dataset(source, split=split, revision=revision).to_pandas()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES)
    )
    if not files:
        raise IngestError(f"{path}: folder holds no {sorted(LOCAL_SUFFIXES)} files")
    frame = pd.concat([_read_file(f) for f in files], ignore_index=True)
    if frame.empty:
        raise IngestError(f"{path}: no records")
    return frame


def source_label(source: str, project_dir: Path) -> str:
    """The source as recorded in the data: project-relative, so that the same data ingested
    from two checkouts gives byte-identical files and the same DVC md5."""
    path = Path(source)
    if path.is_absolute() and path.is_relative_to(project_dir.resolve()):
        return str(path.relative_to(project_dir.resolve()))
    return source


def content_id(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def normalise(frame: pd.DataFrame, config: IngestConfig, source: str, split: str) -> pd.DataFrame:
    """Maps configured fields onto the schema; plain-text data becomes prompt '' + response text."""
    if "text" in frame.columns and config.prompt_field not in frame.columns:
        prompts, responses = [""] * len(frame), frame["text"]
    else:
        missing = [f for f in (config.prompt_field, config.response_field) if f not in frame]
        if missing:
            raise IngestError(
                f"{source}: missing field(s) {missing} (data.prompt_field / data.response_field); "
                f"columns present: {list(frame.columns)}"
            )
        prompts, responses = frame[config.prompt_field], frame[config.response_field]
    table = pd.DataFrame({"prompt": list(prompts), "response": list(responses)})
    table.insert(
        0, "id", [content_id(str(p), str(r)) for p, r in zip(prompts, responses, strict=True)]
    )
    table["source"] = source
    table["split"] = split
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    # No pandas index and a fixed writer: identical inputs give byte-identical files.
    table.to_parquet(path, index=False, engine="pyarrow", compression="zstd")


def ingest(config: IngestConfig, project_dir: Path, staging_dir: Path) -> IngestResult:
    """Reads pool and eval split, normalises both and stages them as {train,eval}.parquet.

    Staged tables reach the DVC-tracked data/ folder only through validation.
    """
    staging_dir.mkdir(parents=True, exist_ok=True)
    refs = {}
    for name, source, split, limit in (
        ("train", config.source, config.split, config.limit),
        ("eval", config.eval_source, config.eval_split, config.eval_limit),
    ):
        frame = read_source(source, split, config.revision, project_dir)
        label = source_label(source, project_dir)
        table = normalise(frame.head(limit) if limit else frame, config, label, name)
        path = staging_dir / f"{name}.parquet"
        write_table(table, path)
        refs[name] = TableRef(path=str(path), rows=len(table), md5=file_md5(path))
    return IngestResult(train=refs["train"], eval=refs["eval"])
