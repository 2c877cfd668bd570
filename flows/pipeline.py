"""The main flow: ingest → validate → version → embed → select → fine-tune → evaluate →
register → promote. Expensive steps are cached on their inputs (content hashes, configs),
the step code they run, device and precision (flows/caching.py), so an unchanged re-run is
served from Prefect's cache and a new budget re-runs only select and what follows. With
select.prior, selection warm-starts from an earlier run's design: a missing prior stops the
run before anything is computed, one from another feature space (or too large for the
budget) stops it at select, before fine-tuning.
"""

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from flows.caching import key
from flows.config import DATA_SOURCES, PipelineConfig, check_paths, flat_params
from flows.runtime import state_dir
from flows.tasks import (
    ChampionRef,
    RunContext,
    T,
    TimedSelection,
    champion_task,
    data_at_rev_task,
    embed_task,
    finetune_task,
    ingest_task,
    prior_task,
    promote_task,
    register_task,
    score_champion_task,
    score_task,
    select_task,
    version_task,
    with_remote_retries,
)
from steps import tracking
from steps.data.ingest import IngestResult, TableRef, format_lines
from steps.data.sources import sources_fingerprint
from steps.data.validate import (
    ValidationReport,
    quarantine_lines,
    raise_on_failure,
    validate_into,
    validated_report,
)
from steps.data.version import DataVersion
from steps.encoding import ChatEncoding, chat_encoding
from steps.evaluation.evaluate import EvalReport
from steps.evaluation.publish import log_scoring, write_run_report
from steps.evaluation.score import Scoring, scored
from steps.evaluation.suites import BenchmarkPlan, metric_keys, plan_benchmarks
from steps.hardware import resolve_hardware
from steps.hashing import code_fingerprint
from steps.modeling import ModelConfig, ModelSource, model_source, trained_source
from steps.registry.gate import check_gate_metric
from steps.registry.lineage import lineage_tags
from steps.registry.register import ModelVersionRef, Promotion, champion_data_md5
from steps.selection.embedding.embed import feature_space
from steps.selection.evidence import select_caution
from steps.selection.select import SelectionRef
from steps.selection.target_sample import reject_target_in_pipeline
from steps.training.finetune import ModelRef

VALIDATE = "steps.data.validate"  # the suite's module: its code keys the validated folder


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    data_md5: str
    pool_examples: int
    quarantined: int
    selected_examples: int
    selected_tokens: int
    train_examples: int  # selected + the prior's examples in the pool (select.prior)
    prior_run: str
    eval_loss_base: float
    eval_loss_finetuned: float
    model_name: str
    model_version: str
    aliases: str
    champion_version: str
    promoted: bool
    promotion_reason: str
    report: str = ""  # the evaluation report (HTML) of base, challenger and champion
    stopped: str = ""  # why the run stopped early (schedule.skip_unchanged: "no new data")


@flow(name="sift-pipeline", log_prints=True)
def pipeline(
    config: PipelineConfig, project_dir: Path, data_rev: str | None = None, new_store: bool = False
) -> PipelineResult:
    """data_rev: a git revision whose data.dvc names the data to use (read through dvc.api,
    already validated when it was versioned) instead of ingesting data.source. new_store:
    create a missing SQLite store although earlier runs' artifacts show one existed
    (tracking.prepare_store)."""
    project_dir = Path(project_dir).resolve()  # a worker's run gets "." (prefect.yaml)
    reject_target_in_pipeline(config.select)  # before any run is tracked or data read
    # every local path a setting names, in data.allowed_roots (data_rev: the data is DVC's)
    check_paths(config, project_dir, skip=DATA_SOURCES if data_rev is not None else ())
    if line := select_caution(config.select):
        print(line)  # once, in the run's log
    device, precision = resolve_hardware(config.model)
    with tracking.tracked_run(
        project_dir,
        config.tracking,
        run_name=f"pipeline-{flow_run.get_name()}",
        # what model.device/precision=auto resolved to: every cache key and result depends on it
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "sift.device": device,
              "sift.precision": precision},
        params=flat_params(config),
        new_store=new_store,
    ) as run_id:  # fmt: skip
        context = RunContext(project_dir, state_dir(project_dir), device, precision, run_id)
        try:
            return _steps(config, context, data_rev)
        except Exception as error:
            # What a person reading the UI (or a notification) sees first, beside the state.
            create_markdown_artifact(
                key="sift-run-failed",
                markdown=f"## Sift pipeline run failed\n\nMLflow run `{run_id}`\n\n"
                f"```\n{type(error).__name__}: {error}\n```\n",
                description="why this run stopped",
            )
            raise


def _steps(config: PipelineConfig, context: RunContext, data_rev: str | None) -> PipelineResult:
    run_id = context.run_id
    # Every benchmark task, its YAML and data checked before anything is computed or loaded.
    plan = plan_benchmarks(config.eval, context.project_dir)
    check_gate_metric(config.registry.gate, metric_keys(plan))
    prior, prior_run = _remote(prior_task, config)(
        named=config.select.prior, model_name=config.registry.model_name, context=context
    )
    tracking.log_tags(run_id, {"select.prior_run": prior_run})
    # before any data is read: a GGUF checkpoint is converted (once) to the folder that
    # validation's tokenizer and every later step load
    model = model_source(config.model, context.state_dir)
    data, version, quarantined, chat = _data(config, model.config, context, data_rev)
    _log_data(run_id, data, version, quarantined)
    if config.schedule.skip_unchanged:
        unchanged = _unchanged(config, run_id, data, version, quarantined)
        if unchanged is not None:
            return unchanged

    features = embed_task(table=data.train, model=model, config=config.embed, context=context,
                          chat=chat)  # fmt: skip
    space = feature_space(features, model.fingerprint, config.embed)
    timed = select_task(
        features=features,
        table=data.train,
        config=config.select,
        space=space,
        prior=prior,
        context=context,
    )
    selection = timed.selection
    _log_selection(run_id, timed)

    tuned = finetune_task(
        table=data.train,
        selection=selection,
        model=model,
        config=config.finetune,
        context=context,
        chat=chat,
    )
    trained = trained_source(config.model, tuned.model_dir)
    base, challenger = (
        score_task(model=source, role=role, label=role, table=data.eval, plan=plan,
                   config=config.eval, context=context, chat=chat)
        for source, role in ((model, "base"), (trained, "challenger"))
    )  # fmt: skip
    base_eval, tuned_eval = _loss(base), _loss(challenger)
    _log_training(run_id, tuned, base_eval, tuned_eval)
    bench_keys = log_scoring(run_id, base, challenger)

    version_ref = _remote(register_task, config)(
        model_dir=tuned.model_dir,
        config=config.registry,
        tags=_lineage_tags(
            config, context, version, model, selection, prior_run, (base_eval, tuned_eval)
        ),
        linked_metrics=bench_keys,
        context=context,
    )
    champion = _champion(config, context, version_ref, data.eval, plan, chat)
    # under the registered model's lock: one gate at a time
    promotion = _remote(promote_task, config)(
        version=version_ref,
        scores=scored(challenger, version.eval_md5),
        base=scored(base, version.eval_md5),
        champion=champion,
        eval_table=data.eval,
        plan=plan,
        model=config.model,
        config=config.eval,
        registry=config.registry,
        context=context,
        chat=chat,
    )
    report = write_run_report(
        run_id, context.state_dir / "reports" / run_id, config.registry.model_name,
        version_ref.version, (base, challenger, champion[1] if champion else None),
    )  # fmt: skip
    create_markdown_artifact(key="sift-evaluation", markdown=report.markdown,
                             description="benchmarks of base, challenger and champion")  # fmt: skip
    result = _result(run_id, data, version, quarantined, timed, prior_run, base_eval, tuned_eval,
                     version_ref, promotion, str(report.html_path))  # fmt: skip
    _publish_summary(result)
    return result


def _remote(task: T, config: PipelineConfig) -> T:
    """A task that talks to a remote, retried after tracking.remote_retry_delays."""
    return with_remote_retries(task, config.tracking.remote_retry_delays)


def _loss(scoring: Scoring) -> EvalReport:
    if scoring.evaluation is None:
        raise RuntimeError("the eval split was not scored")
    return scoring.evaluation


def _champion(
    config: PipelineConfig,
    context: RunContext,
    challenger: ModelVersionRef,
    table: TableRef,
    plan: BenchmarkPlan,
    chat: ChatEncoding | None,
) -> tuple[ChampionRef, Scoring] | None:
    """The current champion scored beside the challenger (on the same data and plan)."""
    name = config.registry.model_name
    champion = _remote(champion_task, config)(model_name=name)
    if champion is None or champion.version == challenger.version:
        return None
    scoring = score_champion_task(
        uri=champion.uri(name),
        weights_md5=champion.weights_md5,
        label=f"champion v{champion.version}",
        table=table,
        plan=plan,
        model=config.model,
        config=config.eval,
        context=context,
        chat=chat,
    )
    return champion, scoring


def _unchanged(
    config: PipelineConfig, run_id: str, data: IngestResult, version: DataVersion, quarantined: int
) -> PipelineResult | None:
    """schedule.skip_unchanged: the champion was trained on exactly this data → stop here."""
    name = config.registry.model_name
    champion = _remote(champion_task, config)(model_name=name)
    if champion is None or champion_data_md5(name, champion.version) != version.dir_md5:
        return None
    reason = f"no new data: the validated data (DVC md5 {version.dir_md5}) is champion " \
             f"v{champion.version}'s; nothing to train (schedule.skip_unchanged=true)"  # fmt: skip
    print(reason)
    tracking.log_tags(run_id, {"sift.stopped": "no new data"})
    create_markdown_artifact(key="sift-run-summary", markdown=f"## No new data\n\n{reason}\n",
                             description="Sift pipeline run: stopped after validation")  # fmt: skip
    return PipelineResult(
        run_id=run_id, data_md5=version.dir_md5, pool_examples=data.train.rows,
        quarantined=quarantined,
        selected_examples=0, selected_tokens=0, train_examples=0, prior_run="none",
        eval_loss_base=float("nan"), eval_loss_finetuned=float("nan"), model_name=name,
        model_version="", aliases="", champion_version=champion.version, promoted=False,
        promotion_reason="not gated: no new data", stopped=reason,
    )  # fmt: skip


def _data(
    config: PipelineConfig, model: ModelConfig, context: RunContext, data_rev: str | None
) -> tuple[IngestResult, DataVersion, int, ChatEncoding | None]:
    """Validated, versioned data: ingest → validate (gate) → DVC, or a past version by rev;
    and how its conversations are encoded, if it holds any. model: the model section as
    loaded (a GGUF's converted folder), whose tokenizer the checks use."""
    project_dir = context.project_dir
    if data_rev is not None:
        data, version = _remote(data_at_rev_task, config)(rev=data_rev, context=context)
        tracking.log_tags(context.run_id, {"dvc.data_rev": data_rev})
        tables = (data.train.path, data.eval.path)
        return data, version, 0, chat_encoding(tables, config.data, model, project_dir)
    source_md5 = sources_fingerprint(config.data, project_dir)  # checks data.allowed_roots
    staged = ingest_task(config=config.data, source_md5=source_md5, context=context)
    for line in format_lines(staged):
        print(line)  # how data.format auto read each source
    chat = chat_encoding((staged.train.path, staged.eval.path), config.data, model, project_dir)
    report = _validated(config, model, staged, context, chat)
    tracking.log_artifact(context.run_id, str(Path(report.data_docs_path).parent), "data_docs")
    create_link_artifact(
        key="data-docs",
        link=Path(report.data_docs_path).resolve().as_uri(),
        link_text="Great Expectations Data Docs",
        description=f"Validation of this run's data: {'passed' if report.success else 'FAILED'}",
    )
    data = raise_on_failure(report)  # gate: nothing below runs on invalid data
    for line in quarantine_lines(report):
        print(line)
    accepted_dir = Path(data.train.path).parent
    version = _remote(version_task, config)(
        source_dir=accepted_dir, config=config.version, context=context
    )
    return data, version, report.quarantined, chat


def _validated(
    config: PipelineConfig,
    model: ModelConfig,
    staged: IngestResult,
    context: RunContext,
    chat: ChatEncoding | None,
) -> ValidationReport:
    """The suite's outcome, from a folder of its own keyed on the staged tables, the checks'
    code, the validation config, the model section and the chat encoding (whose tokenizer,
    context and template the checks use): a later run on the same data reads it back instead
    of running the suite again, and the run's tables stay there, never rewritten by another
    run (data/ is DVC's copy)."""
    folder = key(staged, code_fingerprint(VALIDATE), config.validation, model,
                 *([] if chat is None else [chat]))  # fmt: skip
    final = context.state_dir / "validated" / folder
    report = validated_report(final)
    if report is None:
        report = validate_into(staged, config.validation, model, final, context.run_id, chat)
    return report


def _log_data(run_id: str, data: IngestResult, version: DataVersion, quarantined: int) -> None:
    tracking.log_tags(
        run_id,
        {
            "dvc.md5": version.dir_md5,
            "dvc.train_md5": version.train_md5,
            "dvc.eval_md5": version.eval_md5,
        },
    )
    tracking.log_metrics(
        run_id, {"data.pool_examples": data.train.rows, "data.quarantined": quarantined}
    )
    tracking.log_dataset(run_id, data.train.path, "train-pool", version.train_md5, "training")
    tracking.log_dataset(run_id, data.eval.path, "eval", version.eval_md5, "evaluation")


def _log_selection(run_id: str, timed: TimedSelection) -> None:
    selection = timed.selection
    paths = [selection.selection_path, selection.design_path, selection.plot_path]
    if selection.label_design_path is not None:  # fisher-label's prior, when the pool had one
        paths.append(selection.label_design_path)
    for path in paths:
        tracking.log_artifact(run_id, path, "selection")  # design.npy: a later run's prior
    tracking.log_metrics(
        run_id,
        {
            "select.examples": selection.examples,
            "select.train_examples": selection.train_examples,
            "select.loss_tokens": selection.loss_tokens,
            "select.objective": selection.objective,
            "select.seconds": timed.seconds,
        },
    )


def _log_training(run_id: str, tuned: ModelRef, base: EvalReport, tuned_eval: EvalReport) -> None:
    tracking.log_metrics(
        run_id,
        {
            "finetune.train_loss": tuned.train_loss,
            "finetune.steps": tuned.steps,
            "finetune.seconds": tuned.seconds,
            "eval.loss_base": base.loss,
            "eval.perplexity_base": base.perplexity,
            "eval.loss": tuned_eval.loss,
            "eval.perplexity": tuned_eval.perplexity,
        },
    )
    tracking.log_tags(run_id, {"finetune.trained_in_run": str(tuned.run_id)})


def _lineage_tags(
    config: PipelineConfig,
    context: RunContext,
    version: DataVersion,
    model: ModelSource,
    selection: SelectionRef,
    prior_run: str,
    evals: tuple[EvalReport, EvalReport],
) -> dict[str, str]:
    """What the registered version carries back to its code, data, config and run."""
    # Without a Prefect server (the ephemeral API) there is no UI to link to.
    served = PREFECT_API_URL.value() and PREFECT_UI_URL.value()
    return lineage_tags(
        run_id=context.run_id,
        config=config,
        base_model_md5=model.fingerprint,
        data=version,
        git=tracking.git_state(context.project_dir),
        flow_run_id=str(flow_run.get_id()),
        flow_run_url=flow_run.ui_url if served else None,
        examples=selection.examples,
        prior_run=prior_run,
        evaluation=evals[1],
        base_evaluation=evals[0],
    )


def _result(
    run_id: str,
    data: IngestResult,
    version: DataVersion,
    quarantined: int,
    timed: TimedSelection,
    prior_run: str,
    base_eval: EvalReport,
    tuned_eval: EvalReport,
    version_ref: ModelVersionRef,
    promotion: Promotion,
    report: str,
) -> PipelineResult:
    selection = timed.selection
    champion = promotion.champion_version == version_ref.version
    return PipelineResult(
        run_id=run_id,
        data_md5=version.dir_md5,
        pool_examples=data.train.rows,
        quarantined=quarantined,
        selected_examples=selection.examples,
        selected_tokens=selection.loss_tokens,
        train_examples=selection.train_examples,
        prior_run=prior_run,
        eval_loss_base=base_eval.loss,
        eval_loss_finetuned=tuned_eval.loss,
        model_name=version_ref.name,
        model_version=version_ref.version,
        aliases="challenger, champion" if champion else "challenger",
        champion_version=promotion.champion_version,
        promoted=promotion.promoted,
        promotion_reason=promotion.reason,
        report=report,
    )


def _publish_summary(result: PipelineResult) -> None:
    """The end-of-run summary as the flow run's markdown artifact: readable in the UI."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in summary_rows(result))
    create_markdown_artifact(
        key="sift-run-summary",
        markdown=f"## Sift pipeline run\n\n| field | value |\n|---|---|\n{rows}\n",
        description="data md5, picks, eval before/after, version, aliases, promotion",
    )


def summary_rows(result: object) -> list[tuple[str, str]]:
    """A flow result's fields as (name, value) rows for the CLI's summary table."""
    return [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in vars(result).items()]
