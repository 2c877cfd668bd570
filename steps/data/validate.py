"""Validation: a Great Expectations suite over the ingested pool and eval split.

The suite (steps/data/checks.py) is defined in code, so it is versioned with the repo; GX's
file context stores the results and builds Data Docs HTML for every run. Row-level
expectations run chunk by chunk and whole-split ones on the row keys alone (content hash,
user id), so memory is bounded by the chunk size, not the pool. Messages name each failing
row by its source file and 1-based line or record, read from ingest's places table.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import great_expectations as gx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from great_expectations.data_context.types.base import ProgressBarsConfig
from pydantic import BaseModel, ConfigDict, Field

from steps.data.checks import row_suite, split_suite
from steps.data.conversation_ingest import is_conversation_table
from steps.data.conversation_validation import (
    conversation_row_suite,
    findings_chunks,
    with_conversation_checks,
)
from steps.data.findings import Findings, place_of, read_places
from steps.data.gx_suites import Suites, build_docs, run_suite
from steps.data.ingest import (
    IngestConfig,
    IngestResult,
    TableRef,
    format_lines,
    ingest,
    table_ref,
    write_table,
)
from steps.encoding import ChatEncoding, chat_encoding
from steps.hashing import file_md5
from steps.modeling import ModelConfig, load_tokenizer, prompt_shape

CHUNK_ROWS = 50_000  # rows validated per GX run: bounds memory whatever the pool size
# In a validated folder (validate_into): one line per quarantined row; written last, so a
# folder holding it holds the whole outcome.
QUARANTINE_NOTE = "quarantined.txt"
FLAGGED_NOTE = "flagged.txt"  # beside it: one line per flagged expectation (kept rows)


class ValidateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Real corpora have a few bad rows (GSM8K train has 2 questions longer than stories260K's
    # 512-token context), hence quarantine by default.
    on_invalid: Literal["fail", "quarantine"] = Field(
        default="quarantine",
        description="fail: any failed expectation stops the run; quarantine: rows failing "
        "row-level checks move to data/quarantine.parquet with the reason and the run goes on.",
    )
    max_quarantine_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Quarantine mode: the run stops when more than this fraction of a split is "
        "quarantined.",
    )
    min_train_rows: int = Field(
        default=10,
        gt=0,
        description="Fewest pool rows validation accepts: fewer cannot support a meaningful "
        "selection and fine-tune.",
    )
    min_eval_rows: int = Field(
        default=5, gt=0, description="Fewest evaluation rows validation accepts."
    )
    examples_per_failure: int = Field(
        default=3,
        ge=0,
        description="Offending rows quoted per failed expectation in the error message.",
    )


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    failures: tuple[str, ...]  # one line per failed expectation, with offending values
    quarantined: int  # rows moved to quarantine (0 in fail mode)
    data_docs_path: str
    accepted: IngestResult | None  # the published tables under data/, None on failure
    # One line per quarantined row: split, source place and reasons (quarantine.parquet
    # holds the rows themselves, with their reasons).
    quarantined_rows: tuple[str, ...] = ()
    # One line per expectation of severity FLAG that rows failed: those rows are kept, and
    # named here with their source places.
    flagged: tuple[str, ...] = ()
    # How data.format auto read each source (`sift validate` shows it; ingest.format_lines).
    formats: tuple[str, ...] = ()


def quarantine_lines(report: ValidationReport, shown: int = 20) -> list[str]:
    """What to print about the quarantined and flagged rows: "quarantined <row>" for the
    first `shown` quarantined rows, then how many more, and "flagged <expectation>" for each
    expectation whose rows were kept but named."""
    lines = [f"quarantined {row}" for row in report.quarantined_rows[:shown]]
    if len(report.quarantined_rows) > shown:
        more = len(report.quarantined_rows) - shown
        lines.append(f"quarantined ... and {more} more (quarantine.parquet)")
    return lines + [f"flagged {line}" for line in report.flagged]


class DataValidationError(ValueError):
    """The data failed the suite; nothing downstream may run."""


def _chunks(path: str) -> Iterator[pd.DataFrame]:
    """A staged table in chunks whose index is the row's position in the whole file."""
    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
        frame = batch.to_pandas()
        frame.index = pd.RangeIndex(offset, offset + len(frame))
        offset += len(frame)
        yield frame


def _with_token_counts(frame: pd.DataFrame, model: ModelConfig, tokenizer) -> pd.DataFrame:
    shape = prompt_shape(tokenizer, model)
    prompts = [shape.text(p) if isinstance(p, str) else "" for p in frame.prompt]
    counts: list[int] = []
    for start in range(0, len(prompts), 10_000):  # batches: token id lists are large
        # verbose=False: a prompt past the model's context is what the check finds and reports
        # (with its true length), not a mistake for transformers to warn of as it counts.
        batch = tokenizer(prompts[start : start + 10_000], verbose=False,
                          add_special_tokens=shape.add_special_tokens)["input_ids"]  # fmt: skip
        counts += [len(ids) for ids in batch]
    return frame.assign(prompt_tokens=counts)


def _check_splits(
    suites: Suites,
    keys: dict[str, pd.DataFrame],
    config: ValidateConfig,
    found: Findings,
    same: dict[str, str],
) -> None:
    """Whole-split expectations; eval's leakage check uses the (possibly cleaned) train keys.
    `same`: what a split's content hash covers, for the messages."""
    leaked = sorted(set(keys["train"].content_id) & set(keys["eval"].content_id))
    for split, frame in keys.items():
        min_rows = config.min_train_rows if split == "train" else config.min_eval_rows
        suite = split_suite(split, min_rows, leaked, "id" in frame.columns, same[split])
        found.add(split, run_suite(suites, split, frame, suite), config.examples_per_failure)


def _keys(table: TableRef, ids: pd.Series) -> pd.DataFrame:
    """A split's keys: content hashes (from ingest's places table; for a table ingest did not
    stage, its id column, which then holds them) and the user's ids where they differ."""
    if table.staged is None:
        return pd.DataFrame({"content_id": ids})
    hashes = pq.read_table(table.staged.places_path, columns=["content_id"]).column(0)
    content = pd.Series(hashes.to_pylist(), index=ids.index, dtype=ids.dtype)
    if (ids == content).all():
        return pd.DataFrame({"content_id": content})
    return pd.DataFrame({"content_id": content, "id": ids.where(ids != content)})


def _check_rows(
    suites: Suites,
    split: str,
    table: TableRef,
    model: ModelConfig,
    tokenizer,
    config,
    found: Findings,
    chat: ChatEncoding | None,
) -> pd.DataFrame:
    """Row-level expectations, chunk by chunk; returns the split's keys for _check_splits.
    A table of conversations gets their checks (conversation_validation.py), encoded with
    `chat`."""
    empty_prompt = table.staged.empty_prompt if table.staged is not None else None
    conversations = is_conversation_table(table.path)
    if conversations and chat is None:
        raise ValueError(f"{table.path}: conversations, and no chat encoding to check them with")
    findings = findings_chunks(table, CHUNK_ROWS)
    columns = []
    for chunk in _chunks(table.path):
        if conversations:
            assert chat is not None  # checked above
            chunk = with_conversation_checks(chunk, next(findings), tokenizer, model, chat)
            suite = conversation_row_suite()
        else:
            chunk = _with_token_counts(chunk, model, tokenizer)
            suite = row_suite(model.max_length, empty_prompt)  # GX binds expectations to one suite
        outcomes = run_suite(suites, f"{split}_rows", chunk, suite)
        found.add(split, outcomes, config.examples_per_failure)
        columns.append(chunk["id"])
    return _keys(table, pd.concat(columns))


def validate(
    staged: IngestResult,
    config: ValidateConfig,
    model: ModelConfig,
    gx_dir: Path,
    data_dir: Path,
    chat: ChatEncoding | None = None,
) -> ValidationReport:
    """Runs the suite on the staged tables; only data that passes is written to data_dir.
    `chat`: how tables of conversations are encoded (steps/encoding.py chat_encoding)."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suites = Suites(context)
    tokenizer = load_tokenizer(model)
    tables = {"train": staged.train, "eval": staged.eval}
    found = Findings()
    keys = {
        split: _check_rows(suites, split, table, model, tokenizer, config, found, chat)
        for split, table in tables.items()
    }
    same = {
        split: "conversation" if is_conversation_table(table.path) else "prompt and response"
        for split, table in tables.items()
    }
    _check_splits(suites, keys, config, found, same)
    drop: dict[str, dict[int, list[str]]] = {split: {} for split in tables}
    failing, unfixable, too_many = found, False, []
    if found.failures and config.on_invalid == "quarantine":
        drop = {split: found.reasons.get(split, {}) for split in tables}
        too_many = [
            f"[{split}] quarantine would drop {len(drop[split])} of {len(keys[split])} rows, "
            f"above validation.max_quarantine_fraction={config.max_quarantine_fraction}"
            for split in tables
            if len(drop[split]) > config.max_quarantine_fraction * len(keys[split])
        ]
        unfixable = any(not failure.indexed for failure in found.failures.values())
        if not (unfixable or too_many):
            # Rows that failed row-level checks are gone; the whole-split checks must now pass.
            cleaned = {split: keys[split].drop(index=sorted(drop[split])) for split in tables}
            failing = Findings()
            _check_splits(suites, cleaned, config, failing, same)
    build_docs(suites)
    wanted = failing.rows()
    for split, quoted in found.rows().items():  # the flagged rows' places too
        wanted.setdefault(split, set()).update(quoted)
    for split, rows in drop.items():
        wanted.setdefault(split, set()).update(rows)
    places = read_places(tables, wanted)
    failures = failing.lines(config.examples_per_failure, places)
    if unfixable or too_many:
        first = [*found.lines(3, places, unfixable_only=True), *too_many]
        failures = list(dict.fromkeys([*first, *failures]))
    docs = _docs_path(gx_dir)
    if failures:
        return ValidationReport(False, tuple(failures), 0, str(docs), accepted=None)
    paths = {split: table.path for split, table in tables.items()}
    accepted, quarantined = publish(paths, drop, data_dir)
    notes = tuple(
        f"[{split}] {place_of(row, places[split])}: {'; '.join(reasons)}"
        for split, rows in drop.items()
        for row, reasons in sorted(rows.items())
    )
    flagged = found.flag_lines(config.examples_per_failure, places)
    return ValidationReport(
        True, (), quarantined, str(docs), accepted, quarantined_rows=notes, flagged=flagged
    )


def _docs_path(gx_dir: Path) -> Path:
    return gx_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"


def validate_into(
    staged: IngestResult,
    config: ValidateConfig,
    model: ModelConfig,
    final_dir: Path,
    run_id: str,
    chat: ChatEncoding | None = None,
) -> ValidationReport:
    """Validates in a folder of this run's own (final_dir.<run_id>: its own Great Expectations
    project and accepted tables), then renames it to final_dir, which the caller keys on all
    that decides the outcome. Two runs at once shared one GX project and one data/ before:
    one failed ('ExpectationSuite() argument after ** must be a mapping'). When another run's
    folder got there first it is kept (same key, same tables) and this run's is removed. On
    failure the run's folder stays: its Data Docs show what failed."""
    scratch = final_dir.with_name(f"{final_dir.name}.{run_id}")
    report = validate(staged, config, model, scratch / "gx", scratch / "data", chat)
    if not report.success:
        return report
    (scratch / FLAGGED_NOTE).write_text("".join(f"{line}\n" for line in report.flagged))
    (scratch / QUARANTINE_NOTE).write_text("".join(f"{row}\n" for row in report.quarantined_rows))
    try:
        scratch.rename(final_dir)  # atomic; fails when final_dir exists (another run's)
    except OSError:
        if not (final_dir / QUARANTINE_NOTE).exists():
            raise
        shutil.rmtree(scratch)
    validated = validated_report(final_dir)
    assert validated is not None  # the note was written before the rename
    return validated


def validated_report(final_dir: Path) -> ValidationReport | None:
    """The outcome validate_into left in final_dir (accepted tables, quarantine lines, Data
    Docs); None when it holds none yet."""
    note = final_dir / QUARANTINE_NOTE
    if not note.exists():
        return None
    rows = tuple(note.read_text().splitlines())
    data = final_dir / "data"
    accepted = IngestResult(table_ref(data / "train.parquet"), table_ref(data / "eval.parquet"))
    docs = str(_docs_path(final_dir / "gx"))
    flags = final_dir / FLAGGED_NOTE
    flagged = tuple(flags.read_text().splitlines()) if flags.exists() else ()
    return ValidationReport(
        True, (), len(rows), docs, accepted, quarantined_rows=rows, flagged=flagged
    )


def publish(
    paths: dict[str, str], drop: dict[str, dict[int, list[str]]], data_dir: Path
) -> tuple[IngestResult, int]:
    """Streams validated tables into the DVC-tracked folder without the dropped rows, which go
    to quarantine.parquet with their reasons (written even when empty)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    refs, quarantined = {}, []
    for split, path in paths.items():
        target, rows, writer = data_dir / f"{split}.parquet", 0, None
        for chunk in _chunks(path):
            bad = [row for row in chunk.index if row in drop[split]]
            quarantined.append(
                chunk.loc[bad].assign(reason=["; ".join(drop[split][row]) for row in bad])
            )
            table = pa.Table.from_pandas(chunk.drop(index=bad), preserve_index=False)
            if writer is None:  # the same writer settings as write_table (pandas.to_parquet)
                writer = pq.ParquetWriter(target, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
        if writer is not None:
            writer.close()
        refs[split] = TableRef(path=str(target), rows=rows, md5=file_md5(target))
    write_table(pd.concat(quarantined, ignore_index=True), data_dir / "quarantine.parquet")
    return IngestResult(train=refs["train"], eval=refs["eval"]), sum(len(q) for q in quarantined)


def raise_on_failure(report: ValidationReport) -> IngestResult:
    """The gate: a failed suite stops the run with every failed expectation named."""
    if not report.success or report.accepted is None:
        lines = "\n  ".join(report.failures)
        raise DataValidationError(
            f"data validation failed ({len(report.failures)} problem(s)); data/ left unchanged:"
            f"\n  {lines}\nData Docs: {report.data_docs_path}"
        )
    return report.accepted


def ingest_and_validate(
    data: IngestConfig,
    config: ValidateConfig,
    model: ModelConfig,
    project_dir: Path,
    work_dir: Path,
) -> ValidationReport:
    """`sift validate`: the pipeline's ingest and suite, alone. Accepted tables (and the
    quarantine) go to work_dir/data for inspection, never to the project's DVC-tracked data/."""
    staged = ingest(data, project_dir, work_dir / "staging")
    chat = chat_encoding((staged.train.path, staged.eval.path), data, model, project_dir)
    report = validate(staged, config, model, work_dir / "gx", work_dir / "data", chat)
    return replace(report, formats=tuple(format_lines(staged)))
