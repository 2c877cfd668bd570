"""The Prefect tasks both flows run: one thin wrapper per step, with its caching and retries.

Every task takes keyword arguments and a RunContext; a cached task derives its work folder
from its own inputs (`work_dir`), so a folder never holds results of other inputs, other
code, another device or another precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import pandas as pd
from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from flows.caching import TrainedWeights, cached, healed, key
from flows.registry_lock import RegistryLockError, registry_lock
from steps import tracking
from steps.data.ingest import IngestConfig, IngestResult, TableRef, ingest
from steps.data.version import DataVersion, VersionConfig, data_at_rev, version_data
from steps.encoding import ChatEncoding
from steps.evaluation.evaluate import EvalConfig, EvalReport, evaluate
from steps.evaluation.score import Scoring, score_registered, score_source, scored
from steps.evaluation.suites import BenchmarkPlan
from steps.hashing import code_fingerprint
from steps.integrity import CorruptArtifactError
from steps.modeling import ModelConfig, ModelSource
from steps.registry.register import (
    ModelVersionRef,
    Promotion,
    RegisterConfig,
    Scored,
    champion_run,
    champion_version,
    promote,
    register_model,
)
from steps.selection.embedding.embed import EmbedConfig, FeaturesRef, embed_pool, features_problem
from steps.selection.select import (
    PriorRef,
    SelectConfig,
    SelectionRef,
    load_prior,
    select_subset,
    selected_ids,
)
from steps.study.synthetic import SyntheticConfig, run_synthetic
from steps.tracking import TrackingConfig
from steps.training.finetune import (
    FinetuneConfig,
    ModelRef,
    NonFiniteLossError,
    finetune,
    model_problem,
)

# The step module each cached task runs; its code fingerprint keys the cache and the folder.
INGEST = "steps.data.ingest"
EMBED = "steps.selection.embedding.embed"
SELECT = "steps.selection.select"
FINETUNE = "steps.training.launch"  # the worker entry point: it imports finetune and all it runs
EVALUATE = "steps.evaluation.evaluate"
SCORE = "steps.evaluation.score"
SYNTHETIC = "steps.study.synthetic"

T = TypeVar("T", bound=Task)


@dataclass(frozen=True)
class RunContext:
    """What every task of one flow run shares: where state lives, the resolved hardware,
    and the MLflow run its work is logged to."""

    project_dir: Path
    state_dir: Path
    device: str  # resolved: cpu | cuda
    precision: str  # resolved: fp32 | bf16 | fp16
    run_id: str  # per run (or per study trial): never part of a cache key

    def cache_key(self) -> str:
        return key(str(self.state_dir), self.device, self.precision)


def _chat(chat: ChatEncoding | None) -> tuple[ChatEncoding, ...]:
    """A work folder's key part for `chat`: none for prompt/response rows, whose folders keep
    the keys they had before conversations were read."""
    return () if chat is None else (chat,)


def work_dir(context: RunContext, kind: str, module: str, *inputs: object) -> Path:
    """state_dir/kind/<key>: the key covers the inputs, the code that runs, device, precision."""
    parts = (*inputs, code_fingerprint(module), context.device, context.precision)
    return context.state_dir / kind / key(*parts)


# A remote (MLflow, DVC remote, Prefect API) down for a few seconds up to ~a minute is
# survived by these retries; one that stays down fails the task with its error. A run sets
# its own waits from tracking.remote_retry_delays (with_remote_retries).
_REMOTE_DELAYS = list(TrackingConfig().remote_retry_delays)
REMOTE_RETRIES: dict = {"retries": len(_REMOTE_DELAYS), "retry_delay_seconds": _REMOTE_DELAYS}


def with_remote_retries(task: T, delays: Sequence[float]) -> T:
    """A remote task retried after each of these waits (tracking.remote_retry_delays)."""
    retried = task.with_options(retries=len(delays), retry_delay_seconds=list(delays))
    return cast(T, retried)  # with_options returns the same kind of task


def retry_unless(*final: type[BaseException]):
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


@task(name="ingest", cache_policy=cached(INGEST), persist_result=True)
def ingest_task(*, config: IngestConfig, source_md5: str, context: RunContext) -> IngestResult:
    """source_md5 (ingest.sources_fingerprint) keys the cache on the sources' content."""
    staging = work_dir(context, "staging", INGEST, source_md5, config)
    return ingest(config, context.project_dir, staging)


@task(name="embed", cache_policy=cached(EMBED), persist_result=True)
def _embed(
    *,
    table: TableRef,
    model: ModelSource,
    config: EmbedConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> FeaturesRef:
    """chat: how a pool of conversations is encoded (None: prompt/response rows)."""
    out_dir = work_dir(context, "features", EMBED, table.md5, model, config, *_chat(chat))
    return embed_pool(table.path, model.config, config, out_dir, context.device,
                      context.precision, chat)  # fmt: skip


# A hit whose .npy files changed since they were written is embedded again (its intact chunks
# are reused: only the merge is redone).
embed_task = healed(_embed, features_problem)


@dataclass(frozen=True)
class TimedSelection:
    selection: SelectionRef
    seconds: float  # of the selection itself, kept with the cached result


@task(name="select", cache_policy=cached(SELECT), persist_result=True)
def select_task(
    *,
    features: FeaturesRef,
    table: TableRef,
    config: SelectConfig,
    space: str,
    prior: PriorRef | None,
    context: RunContext,
) -> TimedSelection:
    # prior carries its design's md5: another champion is another cache key
    out_dir = work_dir(context, "selections", SELECT, features, table.md5, config, space, prior)
    started = time.perf_counter()
    selection = select_subset(
        features, table.path, config, out_dir, space=space, prior=prior, device=context.device
    )
    return TimedSelection(selection, time.perf_counter() - started)


@task(
    name="finetune",
    cache_policy=cached(FINETUNE),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_unless(NonFiniteLossError),  # resumes; a divergence won't
)
def _finetune(
    *,
    table: TableRef,
    selection: SelectionRef,
    model: ModelSource,
    config: FinetuneConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> ModelRef:
    """A retry resumes from the checkpoints in the same folder (its inputs are the same)."""
    out_dir = work_dir(context, "models", FINETUNE, table.md5, selection, model, config,
                       *_chat(chat))  # fmt: skip
    return finetune(
        train_path=table.path,
        selected_ids=selected_ids(selection),
        model_config=model.config,
        config=config,
        out_dir=out_dir,
        device=context.device,
        precision=context.precision,
        run_id=context.run_id,
        chat=chat,
    )


# A hit whose weights are unreadable or not the bytes training saved is trained again; the
# scores below are keyed on the weights' md5, so the old model's scores never come with it.
finetune_task = healed(_finetune, model_problem)

# Scores of a fine-tuned folder are keyed on its weights' bytes too (TrainedWeights).
WEIGHTS_KEYED = TrainedWeights()


@task(name="evaluate", cache_policy=cached(EVALUATE) + WEIGHTS_KEYED, persist_result=True)
def evaluate_task(
    *,
    model: ModelSource,
    table: TableRef,
    config: EvalConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> EvalReport:
    return evaluate(model, table.path, config, context.device, context.precision, chat)


@task(name="synthetic", cache_policy=cached(SYNTHETIC), persist_result=True)
def synthetic_task(*, config: SyntheticConfig) -> pd.DataFrame:
    return run_synthetic(config)


# I/O against remotes (DVC push, the MLflow registry) can fail transiently: retry those.
@task(name="version", **REMOTE_RETRIES, cache_policy=NO_CACHE)
def version_task(*, source_dir: Path, config: VersionConfig, context: RunContext) -> DataVersion:
    """The validated tables in source_dir become data/, which DVC versions and pushes."""
    data_dir = context.project_dir / "data"
    return version_data(data_dir, context.project_dir, config, source_dir=source_dir)


@task(name="data-at-rev", **REMOTE_RETRIES, cache_policy=NO_CACHE)
def data_at_rev_task(*, rev: str, context: RunContext) -> tuple[IngestResult, DataVersion]:
    return data_at_rev(context.project_dir, rev, context.state_dir / "data-revs" / rev)


@task(
    name="register",
    **REMOTE_RETRIES,
    retry_condition_fn=retry_unless(CorruptArtifactError),  # the same bytes on every try
    cache_policy=NO_CACHE,
)
def register_task(
    *,
    model_dir: str,
    config: RegisterConfig,
    tags: dict[str, str],
    linked_metrics: tuple[str, ...],
    context: RunContext,
) -> ModelVersionRef:
    return register_model(model_dir, context.run_id, config, tags, linked_metrics)


@task(name="evaluate", cache_policy=cached(SCORE) + WEIGHTS_KEYED, persist_result=True)
def score_task(
    *,
    model: ModelSource,
    role: str,
    label: str,
    table: TableRef,
    plan: BenchmarkPlan,
    config: EvalConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> Scoring:
    """Held-out loss, benchmarks and sample generations of a base or fine-tuned model."""
    out_dir = work_dir(context, "benchmarks", SCORE, model, table.md5, plan, config, *_chat(chat))
    return score_source(model, role=role, label=label, eval_path=table.path, config=config,
                        plan=plan, out_dir=out_dir, device=context.device,
                        precision=context.precision, chat=chat)  # fmt: skip


@dataclass(frozen=True)
class ChampionRef:
    version: str
    weights_md5: str

    def uri(self, name: str) -> str:
        return f"models:/{name}/{self.version}"


@task(name="champion", **REMOTE_RETRIES, cache_policy=NO_CACHE)
def champion_task(*, model_name: str) -> ChampionRef | None:
    found = champion_version(model_name)
    return ChampionRef(*found) if found else None


@task(name="score-champion", cache_policy=cached(SCORE), persist_result=True)
def score_champion_task(
    *,
    uri: str,
    weights_md5: str,
    label: str,
    table: TableRef,
    plan: BenchmarkPlan,
    model: ModelConfig,
    config: EvalConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> Scoring:
    """The current champion scored on this run's data and plan; cached on its weights, so a
    champion that stays is scored once."""
    out_dir = work_dir(context, "benchmarks", SCORE, weights_md5, table.md5, plan, model, config,
                       *_chat(chat))  # fmt: skip
    return score_registered(uri, model, role="champion", label=label, eval_path=table.path,
                            config=config, plan=plan, out_dir=out_dir, device=context.device,
                            precision=context.precision, chat=chat)  # fmt: skip


@task(
    name="promote",
    **REMOTE_RETRIES,
    retry_condition_fn=retry_unless(RegistryLockError),
    cache_policy=NO_CACHE,
)
def promote_task(
    *,
    version: ModelVersionRef,
    scores: Scored,
    base: Scored | None = None,
    champion: tuple[ChampionRef, Scoring] | None,
    eval_table: TableRef,
    plan: BenchmarkPlan,
    model: ModelConfig,
    config: EvalConfig,
    registry: RegisterConfig,
    context: RunContext,
    chat: ChatEncoding | None = None,
) -> Promotion:
    """The champion gate (register.promote) under the registered model's lock. A champion
    scored on other eval data or another benchmark plan is re-scored inside it: from this
    run's scoring of it when it is still the same version, else afresh. A retry is safe: the
    gate re-reads the champion, and a version that is champion already stays. `base` (the
    base model's scores, same data and plan) is what a first version must beat where
    registry.gate.first_version=beat_base."""

    def score_champion(model_uri: str) -> Scored:
        current = champion_version(version.name)
        if champion is not None and current is not None and current[0] == champion[0].version:
            return scored(champion[1], scores.eval_md5)
        fresh = score_registered(model_uri, model, role="champion", label=model_uri,
                                 eval_path=eval_table.path, config=config, plan=plan,
                                 out_dir=context.state_dir / "benchmarks" / "rescored",
                                 device=context.device, precision=context.precision,
                                 chat=chat)  # fmt: skip
        return scored(fresh, scores.eval_md5)

    with registry_lock(version.name):
        return promote(version, scores, score_champion, registry.gate, enabled=registry.promote,
                       base=base)  # fmt: skip


NO_CHAMPION = "none (no champion yet)"


@task(
    name="prior",
    **REMOTE_RETRIES,
    retry_condition_fn=retry_unless(ValueError),  # a bad select.prior: no retry
    cache_policy=NO_CACHE,
)
def prior_task(*, named: str, model_name: str, context: RunContext) -> tuple[PriorRef | None, str]:
    """select.prior → the earlier run's selection to warm-start from (downloaded under
    state_dir/priors), and the select.prior_run tag: its run id, "none", or NO_CHAMPION when
    select.prior=champion finds no champion yet (the first run of a schedule): a cold start."""
    if not named:
        return None, "none"
    source = champion_run(model_name) if named == "champion" else named
    if source is None:
        print(
            f"select.prior=champion: registry model {model_name!r} has no "
            "champion yet, so this run selects without a prior"
        )
        return None, NO_CHAMPION
    destination = context.state_dir / "priors" / source
    selection_path = tracking.download_selection(source, destination, "select.prior")
    return load_prior(selection_path, source, "select.prior"), source
