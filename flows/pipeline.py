"""The main flow: ingest → validate → version → embed → select → fine-tune → evaluate →
register → promote. Expensive steps are cached on their inputs (content hashes, configs),
so an unchanged re-run is served from Prefect's cache and a new budget re-runs only
select and what follows. With select.prior, selection warm-starts from an earlier run's
design: a missing prior stops the run before anything is computed, one from another
feature space (or too large for the budget) stops it at select, before fine-tuning.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.caching import CACHED, key
from flows.config import PipelineConfig, flat_params
from flows.runtime import state_dir
from steps import tracking
from steps.data.ingest import IngestResult, ingest, sources_fingerprint
from steps.data.validate import raise_on_failure, validate
from steps.data.version import DataVersion, data_at_rev, version_data
from steps.evaluation.evaluate import EvalReport, evaluate, evaluate_registered
from steps.modeling import model_fingerprint, resolve_device, resolve_precision
from steps.registry.register import ModelVersionRef, champion_run, promote, register_model
from steps.selection.embed import FeaturesRef, embed_pool, feature_space
from steps.selection.select import PriorRef, SelectionRef, load_prior, select_subset, selected_ids
from steps.training.finetune import ModelRef, NonFiniteLossError, finetune


# I/O against remotes (DVC push, the MLflow registry) can fail transiently: retry those.
@task(name="version", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def version_task(data_dir: Path, repo_dir: Path, config) -> DataVersion:
    return version_data(data_dir, repo_dir, config)


@task(name="data-at-rev", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def data_at_rev_task(repo_dir: Path, rev: str, out_dir: Path) -> tuple[IngestResult, DataVersion]:
    return data_at_rev(repo_dir, rev, out_dir)


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(model_dir: str, run_id: str, config, tags: dict[str, str]) -> ModelVersionRef:
    return register_model(model_dir, run_id, config, tags)


@task(name="ingest", cache_policy=CACHED, persist_result=True)
def ingest_task(config, project_dir: Path, staging_dir: Path, source_md5: str) -> IngestResult:
    return ingest(config, project_dir, staging_dir)  # source_md5 keys the cache on content


@task(name="embed", cache_policy=CACHED, persist_result=True)
def embed_task(
    train_path, train_md5: str, model, model_md5: str, config, out_dir, device
) -> FeaturesRef:
    return embed_pool(train_path, model, config, out_dir, device)


@task(name="select", cache_policy=CACHED, persist_result=True)
def select_task(
    features, train_path, train_md5: str, config, space: str, prior: PriorRef | None, out_dir
) -> SelectionRef:
    # prior carries its design's md5: another champion is another cache key
    return select_subset(features, train_path, config, out_dir, space=space, prior=prior)


def _retry_unless(*final: type[BaseException]):
    """A task's retry condition: retry any failure except these (a retry cannot fix them)."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except final:
            return False
        except BaseException:
            return True
        return True

    return condition


@task(
    name="finetune",
    cache_policy=CACHED,
    persist_result=True,
    retries=1,
    retry_condition_fn=_retry_unless(NonFiniteLossError),  # resumes; a divergence won't
)
def finetune_task(
    train_path, train_md5, selection, model, model_md5, config, out_dir, device, precision, run_id
) -> ModelRef:
    return finetune(
        train_path, selected_ids(selection), model, config, out_dir, device, precision, run_id
    )


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate_task(
    model_dir: str, weights_key: str, eval_path, eval_md5: str, model, config, device
) -> EvalReport:
    return evaluate(model_dir, eval_path, model, config, device)


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


@flow(name="sift-pipeline", log_prints=True)
def pipeline(
    config: PipelineConfig, project_dir: Path, data_rev: str | None = None
) -> PipelineResult:
    """data_rev: a git revision whose data.dvc names the data to use (read through dvc.api,
    already validated when it was versioned) instead of ingesting data.source."""
    state = state_dir(project_dir)
    device = resolve_device(config.model.device)
    precision = resolve_precision(config.model.precision, device)
    run_id = tracking.start_run(
        project_dir,
        config.tracking,
        run_name=f"pipeline-{flow_run.get_name()}",
        tags={"prefect.flow_run_id": str(flow_run.get_id())},
        params=flat_params(config),
    )
    try:
        result = _steps(config, project_dir, state, device, precision, run_id, data_rev)
    except BaseException as error:
        tracking.end_run(run_id, error)
        raise
    tracking.end_run(run_id)
    return result


NO_CHAMPION = "none (no champion yet)"


@task(
    name="prior",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless(ValueError),  # a bad select.prior: no retry
    cache_policy=NO_CACHE,
)
def resolve_prior(config: PipelineConfig, state: Path) -> tuple[PriorRef | None, str]:
    """select.prior → the earlier run's selection to warm-start from (downloaded under
    state/priors), and the select.prior_run tag: its run id, "none", or NO_CHAMPION when
    select.prior=champion finds no champion yet (the first run of a schedule): a cold start."""
    named = config.select.prior
    if not named:
        return None, "none"
    source = champion_run(config.registry.model_name) if named == "champion" else named
    if source is None:
        print(
            f"select.prior=champion: registry model {config.registry.model_name!r} has no "
            "champion yet, so this run selects without a prior"
        )
        return None, NO_CHAMPION
    selection_path = tracking.download_selection(source, state / "priors" / source, "select.prior")
    return load_prior(selection_path, source, "select.prior"), source


def _data(
    config: PipelineConfig, project_dir: Path, state: Path, run_id: str, data_rev: str | None
) -> tuple[IngestResult, DataVersion, int]:
    """Validated, versioned data: ingest → validate (gate) → DVC, or a past version by rev."""
    if data_rev is not None:
        data, version = data_at_rev_task(project_dir, data_rev, state / "data-revs" / data_rev)
        tracking.log_tags(run_id, {"dvc.data_rev": data_rev})
        return data, version, 0
    source_md5 = sources_fingerprint(config.data, project_dir)  # checks data.allowed_roots
    staged = ingest_task(config.data, project_dir, state / "staging", source_md5)
    report = validate(staged, config.validation, config.model, state / "gx", project_dir / "data")
    tracking.log_artifact(run_id, str(Path(report.data_docs_path).parent), "data_docs")
    create_link_artifact(
        key="data-docs",
        link=Path(report.data_docs_path).resolve().as_uri(),
        link_text="Great Expectations Data Docs",
        description=f"Validation of this run's data: {'passed' if report.success else 'FAILED'}",
    )
    data = raise_on_failure(report)  # gate: nothing below runs on invalid data
    version = version_task(project_dir / "data", project_dir, config.version)
    return data, version, report.quarantined


def _steps(
    config: PipelineConfig,
    project_dir: Path,
    state: Path,
    device: str,
    precision: str,
    run_id: str,
    data_rev: str | None = None,
) -> PipelineResult:
    prior, prior_run = resolve_prior(config, state)
    tracking.log_tags(run_id, {"select.prior_run": prior_run})
    data, version, quarantined = _data(config, project_dir, state, run_id, data_rev)
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

    model_md5 = model_fingerprint(config.model)
    features = embed_task(
        data.train.path,
        version.train_md5,
        config.model,
        model_md5,
        config.embed,
        state / "features" / key(model_md5, version.train_md5, config.model, config.embed),
        device,
    )
    selection = select_task(
        features,
        data.train.path,
        version.train_md5,
        config.select,
        feature_space(features, model_md5, config.embed),
        prior,
        state / "selections" / key(features, config.select, prior),
    )
    tracking.log_artifact(run_id, selection.selection_path, "selection")
    tracking.log_artifact(run_id, selection.design_path, "selection")  # a later run's prior
    tracking.log_artifact(run_id, selection.plot_path, "selection")
    tracking.log_dataset(run_id, data.train.path, "train-pool", version.train_md5, "training")
    tracking.log_dataset(run_id, data.eval.path, "eval", version.eval_md5, "evaluation")

    tuned = finetune_task(
        data.train.path,
        version.train_md5,
        selection,
        config.model,
        model_md5,
        config.finetune,
        state
        / "models"
        / key(model_md5, version.train_md5, selection, config.model, config.finetune),
        device,
        precision,
        run_id,
    )
    base_eval = evaluate_task(
        config.model.name,
        model_md5,
        data.eval.path,
        version.eval_md5,
        config.model,
        config.eval,
        device,
    )
    tuned_eval = evaluate_task(
        tuned.model_dir,
        tuned.model_dir,
        data.eval.path,
        version.eval_md5,
        config.model,
        config.eval,
        device,
    )
    tracking.log_metrics(
        run_id,
        {
            "select.examples": selection.examples,
            "select.train_examples": selection.train_examples,
            "select.loss_tokens": selection.loss_tokens,
            "select.objective": selection.objective,
            "finetune.train_loss": tuned.train_loss,
            "finetune.steps": tuned.steps,
            "finetune.seconds": tuned.seconds,
            "eval.loss_base": base_eval.loss,
            "eval.perplexity_base": base_eval.perplexity,
            "eval.loss": tuned_eval.loss,
            "eval.perplexity": tuned_eval.perplexity,
        },
    )
    tracking.log_tags(run_id, {"finetune.trained_in_run": str(tuned.run_id)})

    version_ref = register_task(
        tuned.model_dir,
        run_id,
        config.registry,
        {
            "git.sha": tracking.git_sha(project_dir),
            "dvc.md5": version.dir_md5,
            "dvc.train_md5": version.train_md5,
            "mlflow.source_run": run_id,
            "select.selector": config.select.selector,
            "select.examples": str(selection.examples),
            "select.prior_run": prior_run,
        },
    )
    promotion = promote(
        version_ref,
        tuned_eval.loss,
        version.eval_md5,
        lambda uri: evaluate_registered(uri, data.eval.path, config.model, config.eval, device),
        enabled=config.registry.promote,
    )
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
        aliases="challenger, champion"
        if promotion.champion_version == version_ref.version
        else "challenger",
        champion_version=promotion.champion_version,
        promoted=promotion.promoted,
        promotion_reason=promotion.reason,
    )


def summary_rows(result: PipelineResult) -> list[tuple[str, str]]:
    return [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in asdict(result).items()]
