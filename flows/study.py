"""The data-efficiency study: arms × budget kinds × budgets × seeds through the pipeline's own
tasks (ingest → embed once → select → fine-tune → evaluate, flows/tasks.py), each trial a child
MLflow run of one parent, then tables and plots (MLflow, a Prefect artifact,
study.results_dir), plus the paper's synthetic experiment. A budget kind is what the arms are
compared at: equal examples, or equal loss tokens in equal optimiser steps
(study.budget_kinds, steps.study.study.trial_configs). Trials are cached on their inputs, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.caching import key
from flows.config import check_paths, flat_params
from flows.runtime import state_dir
from flows.tasks import (
    RunContext,
    embed_task,
    evaluate_task,
    finetune_task,
    ingest_task,
    select_task,
    synthetic_task,
)
from steps import tracking
from steps.data.ingest import IngestResult, TableRef, table_ref
from steps.data.sources import sources_fingerprint
from steps.data.validate import (
    quarantine_lines,
    raise_on_failure,
    validate_into,
    validated_report,
)
from steps.hardware import resolve_hardware
from steps.modeling import ModelConfig, ModelSource, model_source, trained_source
from steps.selection.embedding.embed import FeaturesRef, feature_space, load_pool
from steps.study import report, study as lib

METRICS = [
    "eval_loss",
    "examples",
    "loss_tokens",
    "tokens_trained",
    "steps",
    "select_seconds",
    "train_seconds",
    "tokens_per_example",
    "pool_tokens_per_example",
    "state_norm",
    "pool_state_norm",
    "base_loss",
    "pool_base_loss",
    "outlier",
    "pool_outlier",
    "heldout_leverage_mean",
    "heldout_leverage_max",
]


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of one study shares: the embedded pool and eval split, the model."""

    context: RunContext  # run_id: the study's parent run
    train: TableRef
    eval: TableRef
    model: ModelSource
    features: FeaturesRef
    heldout: FeaturesRef
    pool_features: FeaturesRef  # the unmodified statistics, for profiling every arm alike


@dataclass(frozen=True)
class StudyResult:
    run_id: str
    trials: int
    base_eval_loss: float
    table_path: str | None
    synthetic_table_path: str | None
    out_dir: str


@flow(name="sift-study", log_prints=True)
def study(config: lib.StudyConfig, project_dir: Path, new_store: bool = False) -> StudyResult:
    """new_store: create a missing SQLite store although earlier runs' artifacts show one
    existed (tracking.prepare_store)."""
    check_paths(config, project_dir)  # before anything is read or tracked, as the pipeline
    device, precision = resolve_hardware(config.model)
    with tracking.tracked_run(
        project_dir,
        config.tracking,
        run_name=f"{config.study.name}-{flow_run.get_name()}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "sift.kind": "study"},
        params={
            **flat_params(config),
            "device": device,
            "precision": precision,
        },
        new_store=new_store,
    ) as run_id:
        context = RunContext(project_dir, state_dir(project_dir), device, precision, run_id)
        return _study(config, context)


def _study(config: lib.StudyConfig, context: RunContext) -> StudyResult:
    out_dir = context.state_dir / "studies" / f"{config.study.name}-{context.run_id[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir = (
        context.project_dir / config.study.results_dir if config.study.results_dir else None
    )
    table_path = synthetic_path = None
    base_loss = float("nan")
    records: list[dict] = []
    if config.study.arms:
        base_loss, records = _real_data(config, context)
        table_path = _report_real(config, records, base_loss, out_dir, context.run_id)
    if config.synthetic.runs > 0:
        synthetic_path = _report_synthetic(
            config, synthetic_task(config=config.synthetic), out_dir, context.run_id
        )
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        for path in out_dir.iterdir():
            shutil.copy2(path, results_dir / path.name)
    return StudyResult(
        context.run_id,
        len(records),
        base_loss,
        table_path,
        synthetic_path,
        str(results_dir or out_dir),
    )


def _real_data(config: lib.StudyConfig, context: RunContext) -> tuple[float, list[dict]]:
    # before any data is read: a GGUF checkpoint is converted (once) to the folder that
    # validation's tokenizer and every later step load
    model = model_source(config.model, context.state_dir)
    source_md5 = sources_fingerprint(config.data, context.project_dir)
    staged = ingest_task(config=config.data, source_md5=source_md5, context=context)
    staged = _validated(config, model.config, staged, context)
    train, heldout_table = staged.train, staged.eval
    if config.study.holdout:
        train_path, eval_path = lib.split_holdout(
            train.path,
            config.study.holdout,
            context.state_dir / "holdout" / key(staged, config.study.holdout),
        )
        train, heldout_table = table_ref(Path(train_path)), table_ref(Path(eval_path))
    parent_id = context.run_id
    tracking.log_tags(parent_id, {"data.train_md5": train.md5, "data.eval_md5": heldout_table.md5})
    features = embed_task(table=train, model=model, config=config.embed, context=context)
    heldout = embed_task(table=heldout_table, model=model, config=config.embed, context=context)
    tracking.log_tags(  # where benchmarks/study_profiles.py finds the statistics
        parent_id,
        {"features.pool_dir": features.features_dir, "features.eval_dir": heldout.features_dir},
    )
    base = evaluate_task(model=model, table=heldout_table, config=config.eval, context=context)
    tracking.log_metrics(parent_id, {"eval.loss_base": base.loss, "data.pool": features.examples})
    shared = TrialInputs(context, train, heldout_table, model, features, heldout, features)
    records = []
    for arm in config.arms():
        arm_inputs = shared
        if arm.length_normalised:
            normalised = lib.length_normalised(
                features, Path(f"{features.features_dir}-length-normalised")
            )
            arm_inputs = replace(shared, features=normalised)
        for kind in config.study.budget_kinds:
            for budget in config.study.budgets:
                for seed in config.study.seeds:
                    records.append(_trial(config, arm, kind, budget, seed, arm_inputs))
    return base.loss, records


def _validated(
    config: lib.StudyConfig, model: ModelConfig, staged: IngestResult, context: RunContext
) -> IngestResult:
    """The pipeline's gate: a row the pipeline would quarantine (e.g. a prompt that fills the
    context, leaving no loss token) is not in the study's pool either. The accepted tables go
    under .sift/, never to the project's DVC-tracked data/, at a path keyed on the staged
    tables, the validation config and the model section as loaded (whose tokenizer and
    context the checks use; a GGUF's converted folder), so later runs' cached trials find
    the same table. A later run finds them
    there and does not run the suite again; it prints the quarantine lines recorded with
    them. Each run validates in a folder of its own first (validate_into)."""
    final = context.state_dir / "studies" / "validated" / key(staged, config.validation, model)
    report = validated_report(final)
    if report is None:
        report = validate_into(staged, config.validation, model, final, context.run_id)
    accepted = raise_on_failure(report)
    for line in quarantine_lines(report):
        print(line)
    return accepted


def _trial(
    config: lib.StudyConfig,
    arm: lib.Arm,
    kind: str,
    budget: float,
    seed: int,
    shared: TrialInputs,
) -> dict:
    """One arm × budget kind × budget × seed: select, fine-tune, evaluate, as a child run."""
    tokens = kind == "tokens"
    with tracking.tracked_run(
        shared.context.project_dir,
        config.tracking,
        run_name=f"{arm.label}-{'t' if tokens else 'b'}{budget:g}-s{seed}",
        tags={"mlflow.parentRunId": shared.context.run_id, "sift.kind": "study-trial"},
        params={"arm": arm.label, "selector": arm.selector, "ridge": arm.ridge,
                "length_normalised": arm.length_normalised, "budget_kind": kind,
                "budget": budget, "seed": seed},
    ) as child_id:  # fmt: skip
        context = replace(shared.context, run_id=child_id)
        # the pool's size and tokens (not an arm's rescaled statistics) set equal steps
        select_config, finetune_config = lib.trial_configs(
            config, arm, kind, budget, seed, shared.pool_features
        )
        timed = select_task(
            features=shared.features,
            table=shared.train,
            config=select_config,
            space=feature_space(shared.features, shared.model.fingerprint, config.embed),
            prior=None,
            context=context,
        )
        selection = timed.selection
        tuned = finetune_task(
            table=shared.train,
            selection=selection,
            model=shared.model,
            config=finetune_config,
            context=context,
        )
        trained = trained_source(config.model, tuned.model_dir)
        report = evaluate_task(
            model=trained, table=shared.eval, config=config.eval, context=context
        )
        profile = lib.selection_profile(
            load_pool(shared.pool_features),
            lib.picked_rows(selection.selection_path),
            load_pool(shared.heldout),
            arm.ridge,
        )
        record = {
            "arm": arm.label,
            "budget_kind": kind,
            "budget": budget,
            "seed": seed,
            "eval_loss": report.loss,
            "examples": selection.examples,
            "loss_tokens": selection.loss_tokens,
            "tokens_trained": tuned.tokens,
            "steps": tuned.steps,  # optimiser steps actually trained
            "select_seconds": timed.seconds,
            "train_seconds": tuned.seconds,
            "train_loss": tuned.train_loss,
            "objective": selection.objective,
            **profile,
        }
        tracking.log_metrics(
            child_id, {k: v for k, v in record.items() if isinstance(v, int | float)}
        )
        tracking.log_artifact(child_id, selection.selection_path, "selection")
    setting = "budget_tokens" if tokens else "budget"
    print(f"{arm.label} {setting}={budget:g} seed={seed}: eval loss {report.loss:.4f}")
    return record


def _report_real(
    config: lib.StudyConfig, records: list[dict], base_loss: float, out_dir: Path, run_id: str
) -> str:
    frame = pd.DataFrame(records)
    confidence = config.study.confidence
    summary = report.aggregate(frame, ["budget_kind", "arm", "budget"], METRICS, confidence)
    deltas = report.paired_by_kind(frame, "eval_loss", lib.BASELINE, confidence)
    frame.to_csv(out_dir / "trials.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    report.plot_study(summary, base_loss, config.study.name, out_dir / "eval_loss.png")
    table = report.results_table(summary, deltas)
    profile = report.profile_table(summary)
    table_path = out_dir / "table.md"
    table_path.write_text(
        f"Base model eval loss: {base_loss:.4f}. Mean ± {confidence:.0%} t-interval over seeds.\n\n"
        f"{table}\n\nWhat each arm picked:\n\n{profile}\n"
    )
    for path in (table_path, out_dir / "trials.csv", out_dir / "eval_loss.png"):
        tracking.log_artifact(run_id, str(path), "study")
    create_markdown_artifact(
        key=_artifact_key(config.study.name),
        markdown=table_path.read_text(),
        description=f"Sift study {config.study.name}: eval loss per arm × budget",
    )
    return str(table_path)


def _report_synthetic(
    config: lib.StudyConfig, records: pd.DataFrame, out_dir: Path, run_id: str
) -> str:
    summary = report.synthetic_summary(records, config.study.confidence)
    records.to_csv(out_dir / "synthetic_runs.csv", index=False)
    summary.to_csv(out_dir / "synthetic_summary.csv", index=False)
    report.plot_synthetic(summary, config.synthetic.runs, out_dir / "synthetic.png")
    path = out_dir / "synthetic_table.md"
    path.write_text(
        f"Prediction error (total variation) of the refitted multinomial logit, mean ± "
        f"{config.study.confidence:.0%} t-interval over {config.synthetic.runs} runs.\n\n"
        f"{report.synthetic_table(records, summary, config.study.confidence)}\n"
    )
    for item in (path, out_dir / "synthetic.png", out_dir / "synthetic_runs.csv"):
        tracking.log_artifact(run_id, str(item), "synthetic")
    create_markdown_artifact(
        key=_artifact_key(f"{config.study.name}-synthetic"),
        markdown=path.read_text(),
        description="FisherSFT synthetic experiment",
    )
    return str(path)


def _artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study"
