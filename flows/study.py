"""The data-efficiency study: arms × budgets × seeds through the pipeline's own steps
(ingest → embed once → select → fine-tune → evaluate), each trial a child MLflow run of one
parent, then tables and plots (MLflow, a Prefect artifact, study.results_dir), plus the
paper's synthetic experiment. Trials are cached on their inputs, so an interrupted study
resumes where it stopped.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.caching import CACHED, key
from flows.runtime import state_dir
from steps import tracking
from steps.data.ingest import IngestResult, ingest, source_fingerprint
from steps.evaluation.evaluate import EvalReport, evaluate
from steps.modeling import model_fingerprint, resolve_device, resolve_precision
from steps.selection.embed import FeaturesRef, embed_pool, load_pool
from steps.selection.select import SelectConfig, SelectionRef, select_subset, selected_ids
from steps.study import study as lib
from steps.study.synthetic import SyntheticConfig, run_synthetic
from steps.training.finetune import ModelRef, finetune

METRICS = [
    "eval_loss",
    "examples",
    "loss_tokens",
    "tokens_trained",
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


@task(name="ingest", cache_policy=CACHED, persist_result=True)
def ingest_task(config, project_dir: Path, staging_dir: Path, source_md5: str) -> IngestResult:
    return ingest(config, project_dir, staging_dir)


@task(name="embed", cache_policy=CACHED, persist_result=True)
def embed_task(
    table_path: str, table_md5: str, model, model_md5: str, config, out_dir, device
) -> FeaturesRef:
    return embed_pool(table_path, model, config, out_dir, device)


@task(name="select", cache_policy=CACHED, persist_result=True)
def select_task(features, train_path, config, out_dir) -> tuple[SelectionRef, float]:
    started = time.perf_counter()
    selection = select_subset(features, train_path, config, out_dir)
    return selection, time.perf_counter() - started


@task(name="finetune", cache_policy=CACHED, persist_result=True)
def finetune_task(
    train_path, selection, model, model_md5, config, out_dir, device, precision, run_id
) -> ModelRef:
    return finetune(
        train_path=train_path,
        selected_ids=selected_ids(selection),
        model_config=model,
        config=config,
        out_dir=out_dir,
        device=device,
        precision=precision,
        run_id=run_id,
    )


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate_task(
    model_dir: str, eval_path: str, eval_md5: str, model, config, device
) -> EvalReport:
    return evaluate(model_dir, eval_path, model, config, device)


@task(name="synthetic", cache_policy=CACHED, persist_result=True)
def synthetic_task(config: SyntheticConfig) -> pd.DataFrame:
    return run_synthetic(config)


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of one study shares: the embedded pool and eval split, the device."""

    project_dir: Path
    train_path: str
    eval_path: str
    eval_md5: str
    model_md5: str
    features: FeaturesRef
    heldout: FeaturesRef
    pool_features: FeaturesRef  # the unmodified statistics, for profiling every arm alike
    device: str
    precision: str
    parent_id: str


@dataclass(frozen=True)
class StudyResult:
    run_id: str
    trials: int
    base_eval_loss: float
    table_path: str | None
    synthetic_table_path: str | None
    out_dir: str


@flow(name="sift-study", log_prints=True)
def study(config: lib.StudyConfig, project_dir: Path) -> StudyResult:
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.model.precision, device)
    params = {
        f"{section}.{name}": value
        for section, fields in config.model_dump().items()
        for name, value in fields.items()
    }
    run_id = tracking.start_run(
        project_dir,
        config.tracking,
        run_name=f"{config.study.name}-{flow_run.get_name()}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "sift.kind": "study"},
        params={**params, "device": device, "precision": precision},
    )
    try:
        result = _study(config, project_dir, device, precision, run_id)
    except BaseException as error:
        tracking.end_run(run_id, error)
        raise
    tracking.end_run(run_id)
    return result


def _study(
    config: lib.StudyConfig, project_dir: Path, device: str, precision: str, run_id: str
) -> StudyResult:
    out_dir = state_dir(project_dir) / "studies" / f"{config.study.name}-{run_id[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir = project_dir / config.study.results_dir if config.study.results_dir else None
    table_path = synthetic_path = None
    base_loss = float("nan")
    records: list[dict] = []
    if config.study.arms:
        base_loss, records = _real_data(config, project_dir, device, precision, run_id)
        table_path = _report_real(config, records, base_loss, out_dir, run_id)
    if config.synthetic.runs > 0:
        synthetic_path = _report_synthetic(
            config, synthetic_task(config.synthetic), out_dir, run_id
        )
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        for path in out_dir.iterdir():
            shutil.copy2(path, results_dir / path.name)
    return StudyResult(
        run_id, len(records), base_loss, table_path, synthetic_path, str(results_dir or out_dir)
    )


def _real_data(
    config: lib.StudyConfig, project_dir: Path, device: str, precision: str, parent_id: str
) -> tuple[float, list[dict]]:
    state = state_dir(project_dir)
    source_md5 = source_fingerprint(config.data.source, project_dir) + source_fingerprint(
        config.data.eval_source, project_dir
    )
    staging = state / "staging" / key(source_md5, config.data)  # limits differ per study
    staged = ingest_task(config.data, project_dir, staging, source_md5)
    train_path, eval_path = staged.train.path, staged.eval.path
    if config.study.holdout:
        train_path, eval_path = lib.split_holdout(
            train_path, config.study.holdout, state / "holdout" / key(staged, config.study.holdout)
        )
    train_md5, eval_md5 = _md5(train_path), _md5(eval_path)
    tracking.log_tags(parent_id, {"data.train_md5": train_md5, "data.eval_md5": eval_md5})
    model_md5 = model_fingerprint(config.model)
    features = embed_task(
        train_path,
        train_md5,
        config.model,
        model_md5,
        config.embed,
        state / "features" / key(model_md5, train_md5, config.model, config.embed),
        device,
    )
    heldout = embed_task(
        eval_path,
        eval_md5,
        config.model,
        model_md5,
        config.embed,
        state / "features" / key(model_md5, eval_md5, config.model, config.embed),
        device,
    )
    tracking.log_tags(  # where benchmarks/study_profiles.py finds the statistics
        parent_id,
        {"features.pool_dir": features.features_dir, "features.eval_dir": heldout.features_dir},
    )
    base = evaluate_task(config.model.name, eval_path, eval_md5, config.model, config.eval, device)
    tracking.log_metrics(parent_id, {"eval.loss_base": base.loss, "data.pool": features.examples})
    shared = TrialInputs(
        project_dir, train_path, eval_path, eval_md5, model_md5, features, heldout, features,
        device, precision, parent_id,
    )  # fmt: skip
    records = []
    for arm in config.arms():
        if arm.length_normalised:
            normalised = lib.length_normalised(
                features, Path(f"{features.features_dir}-length-normalised")
            )
            arm_inputs = replace(shared, features=normalised)
        else:
            arm_inputs = shared
        for budget in config.study.budgets:
            for seed in config.study.seeds:
                records.append(_trial(config, arm, budget, seed, arm_inputs))
    return base.loss, records


def _trial(
    config: lib.StudyConfig, arm: lib.Arm, budget: float, seed: int, shared: TrialInputs
) -> dict:
    """One arm × budget × seed: select, fine-tune, evaluate, as a child run of the study."""
    state = state_dir(shared.project_dir)
    child_id = tracking.start_run(
        shared.project_dir,
        config.tracking,
        run_name=f"{arm.label}-b{budget:g}-s{seed}",
        tags={"mlflow.parentRunId": shared.parent_id, "sift.kind": "study-trial"},
        params={"arm": arm.label, "selector": arm.selector, "ridge": arm.ridge,
                "length_normalised": arm.length_normalised, "budget": budget, "seed": seed},
    )  # fmt: skip
    try:
        select_config = SelectConfig(
            selector=arm.selector, budget=budget, ridge=arm.ridge, seed=seed
        )
        selection, select_seconds = select_task(
            shared.features,
            shared.train_path,
            select_config,
            state / "selections" / key(shared.features, select_config),
        )
        finetune_config = config.finetune.model_copy(update={"seed": seed})
        tuned = finetune_task(
            shared.train_path,
            selection,
            config.model,
            shared.model_md5,
            finetune_config,
            state / "models" / key(shared.model_md5, selection, config.model, finetune_config),
            shared.device,
            shared.precision,
            child_id,
        )
        report = evaluate_task(
            tuned.model_dir,
            shared.eval_path,
            shared.eval_md5,
            config.model,
            config.eval,
            shared.device,
        )
        profile = lib.selection_profile(
            load_pool(shared.pool_features),
            lib.picked_rows(selection.selection_path),
            load_pool(shared.heldout),
            arm.ridge,
        )
        record = {
            "arm": arm.label,
            "budget": budget,
            "seed": seed,
            "eval_loss": report.loss,
            "examples": selection.examples,
            "loss_tokens": selection.loss_tokens,
            "tokens_trained": tuned.tokens,
            "select_seconds": select_seconds,
            "train_seconds": tuned.seconds,
            "train_loss": tuned.train_loss,
            "objective": selection.objective,
            **profile,
        }
        tracking.log_metrics(
            child_id, {k: v for k, v in record.items() if isinstance(v, int | float)}
        )
        tracking.log_artifact(child_id, selection.selection_path, "selection")
    except BaseException as error:
        tracking.end_run(child_id, error)
        raise
    tracking.end_run(child_id)
    print(f"{arm.label} budget={budget:g} seed={seed}: eval loss {report.loss:.4f}")
    return record


def _md5(path: str) -> str:
    from steps.data.ingest import file_md5

    return file_md5(Path(path))


def _report_real(
    config: lib.StudyConfig, records: list[dict], base_loss: float, out_dir: Path, run_id: str
) -> str:
    frame = pd.DataFrame(records)
    confidence = config.study.confidence
    summary = lib.aggregate(frame, ["arm", "budget"], METRICS, confidence)
    deltas = lib.paired_differences(frame, "eval_loss", lib.BASELINE, confidence)
    frame.to_csv(out_dir / "trials.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    lib.plot_study(summary, base_loss, config.study.name, out_dir / "eval_loss.png")
    table = lib.results_table(summary, deltas)
    profile = lib.profile_table(summary)
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
    summary = lib.synthetic_summary(records, config.study.confidence)
    records.to_csv(out_dir / "synthetic_runs.csv", index=False)
    summary.to_csv(out_dir / "synthetic_summary.csv", index=False)
    lib.plot_synthetic(summary, config.synthetic.runs, out_dir / "synthetic.png")
    path = out_dir / "synthetic_table.md"
    path.write_text(
        f"Prediction error (total variation) of the refitted multinomial logit, mean ± "
        f"{config.study.confidence:.0%} t-interval over {config.synthetic.runs} runs.\n\n"
        f"{lib.synthetic_table(records, summary, config.study.confidence)}\n"
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


def summary_rows(result: StudyResult) -> list[tuple[str, str]]:
    return [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in asdict(result).items()]
