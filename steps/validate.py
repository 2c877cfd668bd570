"""Validation: a Great Expectations suite over the ingested pool and eval split.

The suite is defined here, in code, so it is versioned with the repo; GX's file context stores
the results and builds Data Docs HTML for every run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context.types.base import ProgressBarsConfig
from pydantic import BaseModel, ConfigDict, Field

from steps.ingest import (
    SCHEMA,
    IngestConfig,
    IngestResult,
    TableRef,
    file_md5,
    ingest,
    write_table,
)
from steps.modeling import ModelConfig, load_tokenizer

SUITE_NAME = "sift_sft_data"
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"


class ValidateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # fail: any failed expectation stops the run. quarantine: rows failing row-level
    # expectations move to data/quarantine.parquet with the reason, and the run goes on only
    # if that is at most max_quarantine_fraction of a split (real corpora have a few bad rows:
    # GSM8K train has 2 questions longer than stories260K's 512-token context).
    on_invalid: Literal["fail", "quarantine"] = "quarantine"
    max_quarantine_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    # Fewer rows than this cannot support a meaningful selection/fine-tune.
    min_train_rows: int = Field(default=10, gt=0)
    min_eval_rows: int = Field(default=5, gt=0)
    # Offending rows quoted per failed expectation in the error message.
    examples_per_failure: int = Field(default=3, ge=0)


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    failures: tuple[str, ...]  # one line per failed expectation, with offending values
    quarantined: int  # rows moved to quarantine (0 in fail mode)
    data_docs_path: str
    accepted: IngestResult | None  # the published tables under data/, None on failure


class DataValidationError(ValueError):
    """The data failed the suite; nothing downstream may run."""


def build_suite(split: str, min_rows: int, max_prompt_tokens: int, train_ids: list[str]) -> list:
    """The named expectations for one split (the eval split also checks for leakage)."""
    text_columns = ["prompt", "response"]
    suite = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*SCHEMA, "prompt_tokens"], exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        # Prompts may be empty (plain LM data); responses carry the loss and may not.
        gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),
        # A prompt that fills the context leaves no response token to learn from.
        gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=max_prompt_tokens - 1),
    ]
    for column in ["id", *text_columns]:
        suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for column in text_columns:
        # pandas 3 string dtype: "str" is the type name GX matches (see docs/stack-notes).
        suite.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"))
        # Ingest rejects bytes that are not UTF-8; control characters (other than tab and
        # newlines) are valid UTF-8 but are almost always extraction debris.
        suite.append(gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=CONTROL_CHARS))
    # Same prompt and response twice: the ids (content hashes) collide too, but this names it.
    suite.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=text_columns))
    if split == "eval":
        # Leakage: an eval example identical to a training example inflates the eval score.
        suite.append(gxe.ExpectColumnValuesToNotBeInSet(column="id", value_set=train_ids))
    return suite


def _describe_failure(split: str, outcome, examples: int) -> str:
    config = outcome.expectation_config
    column = config.kwargs.get("column")
    details = outcome.result or {}
    where = f" on column '{column}'" if column else ""
    count = details.get("unexpected_count")
    counted = f" ({count} rows)" if count else ""
    rows = details.get("unexpected_index_list") or []
    values = details.get("partial_unexpected_list") or []
    if rows:
        evidence = "; rows (0-based, file order) " + ", ".join(
            f"{row} ({value!r:.60})" for row, value in zip(rows[:examples], values, strict=False)
        )
    elif details.get("observed_value") is not None:
        evidence = f"; observed {details['observed_value']!r:.200}"
    else:
        evidence = ""
    return f"[{split}] {config.type}{where}{counted}{evidence}"


def _with_token_counts(frame: pd.DataFrame, model: ModelConfig) -> pd.DataFrame:
    tokenizer = load_tokenizer(model)
    prompts = [
        model.prompt_template.format(prompt=p) if isinstance(p, str) else "" for p in frame.prompt
    ]
    counts: list[int] = []
    for start in range(0, len(prompts), 10_000):  # batches: token id lists are large
        counts += [len(ids) for ids in tokenizer(prompts[start : start + 10_000])["input_ids"]]
    return frame.assign(prompt_tokens=counts)


def _run_suite(context, split: str, frame: pd.DataFrame, expectations: list) -> list:
    """One checkpoint run (which also rebuilds Data Docs); returns the per-expectation outcomes."""
    source = context.data_sources.add_or_update_pandas(name="sift")
    asset = source.add_dataframe_asset(name=split)
    batch = asset.add_batch_definition_whole_dataframe(f"{split}_all")
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=f"{SUITE_NAME}_{split}", expectations=expectations)
    )
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{SUITE_NAME}_{split}", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{SUITE_NAME}_{split}",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            # COMPLETE gives the index of every offending row, which quarantine needs.
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return [outcome for run in result.run_results.values() for outcome in run.results]


def _check(context, frames: dict[str, pd.DataFrame], config: ValidateConfig, model: ModelConfig):
    """Outcomes per split; eval's leakage check uses the (possibly cleaned) train ids."""
    outcomes = {}
    for split, frame in frames.items():
        min_rows = config.min_train_rows if split == "train" else config.min_eval_rows
        expectations = build_suite(split, min_rows, model.max_length, list(frames["train"].id))
        outcomes[split] = _run_suite(context, split, frame, expectations)
    return outcomes


def _quarantine(
    frames: dict[str, pd.DataFrame], outcomes: dict[str, list]
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, list[str]]:
    """Drops rows named by failed row-level expectations; table-level failures cannot be fixed."""
    kept, dropped, unfixable = {}, [], []
    for split, frame in frames.items():
        reasons: dict[int, list[str]] = {}
        for outcome in outcomes[split]:
            rows = (outcome.result or {}).get("unexpected_index_list")
            if outcome.success:
                continue
            if not rows:
                unfixable.append(_describe_failure(split, outcome, 3))
                continue
            for row in rows:
                reasons.setdefault(int(row), []).append(outcome.expectation_config.type)
        bad = sorted(reasons)
        kept[split] = frame.drop(index=bad).reset_index(drop=True)
        dropped.append(frame.loc[bad].assign(reason=["; ".join(reasons[row]) for row in bad]))
    return kept, pd.concat(dropped, ignore_index=True), unfixable


def validate(
    staged: IngestResult, config: ValidateConfig, model: ModelConfig, gx_dir: Path, data_dir: Path
) -> ValidationReport:
    """Runs the suite on the staged tables; only data that passes is written to data_dir."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    frames = {
        split: _with_token_counts(pd.read_parquet(ref.path), model)
        for split, ref in (("train", staged.train), ("eval", staged.eval))
    }
    outcomes = _check(context, frames, config, model)
    failures = [
        _describe_failure(split, o, config.examples_per_failure)
        for split, results in outcomes.items()
        for o in results
        if not o.success
    ]
    quarantined = frames["train"].iloc[:0].assign(reason="")
    if failures and config.on_invalid == "quarantine":
        cleaned, quarantined, unfixable = _quarantine(frames, outcomes)
        too_many = [
            f"[{split}] quarantine would drop {len(frames[split]) - len(cleaned[split])} of "
            f"{len(frames[split])} rows, above validation.max_quarantine_fraction="
            f"{config.max_quarantine_fraction}"
            for split in frames
            if len(frames[split]) - len(cleaned[split])
            > config.max_quarantine_fraction * len(frames[split])
        ]
        if unfixable or too_many:
            failures = list(dict.fromkeys([*unfixable, *too_many, *failures]))
        else:
            frames = cleaned
            outcomes = _check(context, frames, config, model)  # the cleaned data must pass too
            failures = [
                _describe_failure(split, o, config.examples_per_failure)
                for split, results in outcomes.items()
                for o in results
                if not o.success
            ]
    docs = gx_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    if failures:
        return ValidationReport(False, tuple(failures), 0, str(docs), accepted=None)
    accepted = publish(frames, quarantined, data_dir)
    return ValidationReport(True, (), len(quarantined), str(docs), accepted=accepted)


def publish(
    frames: dict[str, pd.DataFrame], quarantined: pd.DataFrame, data_dir: Path
) -> IngestResult:
    """Writes validated tables (and the quarantine, possibly empty) into the DVC-tracked folder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    refs = {}
    for split, frame in frames.items():
        path = data_dir / f"{split}.parquet"
        write_table(frame.drop(columns="prompt_tokens"), path)
        refs[split] = TableRef(path=str(path), rows=len(frame), md5=file_md5(path))
    write_table(
        quarantined.drop(columns="prompt_tokens", errors="ignore"), data_dir / "quarantine.parquet"
    )
    return IngestResult(train=refs["train"], eval=refs["eval"])


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
    return validate(staged, config, model, work_dir / "gx", work_dir / "data")
