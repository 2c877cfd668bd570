"""Registry: log the fine-tuned model to MLflow, register a version, move aliases.

`challenger` always marks the newest version; `champion` moves only when the challenger
beats the champion on registry.gate's metric (eval loss by default), scored on the same
eval data (same DVC md5) and benchmark plan (same task versions and data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps import tracking
from steps.evaluation.results import Scored
from steps.hashing import file_md5
from steps.integrity import CorruptArtifactError, safetensors_problem
from steps.registry.aliases import EVAL_LOSS, EVAL_MD5, move_alias, record_kept
from steps.registry.gate import (
    BENCH_FINGERPRINT,
    BENCH_SCORES,
    EVAL_LOSS_STDERR,
    GATE_DECISION,
    Decision,
    GateConfig,
    decide,
    lower_is_better,
    parse_scores_tag,
    scores_tag,
)
from steps.registry.model_card import model_card

CHALLENGER, CHAMPION = "challenger", "champion"
# Identifies a model's weights, so a cached re-run finds its version instead of adding one.
WEIGHTS_TAG = "sift.weights_md5"


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(
        default="sift-gsm8k", description="MLflow registered model the run's model is added to."
    )
    promote: bool = Field(
        default=True,
        description="false: register and tag challenger but never move champion (e.g. for "
        "manual review).",
    )
    max_new_tokens: int = Field(
        default=128,
        description="Generation default stored with the registered model (MLflow needs one); "
        "caps a served completion.",
    )
    gate: GateConfig = Field(
        default_factory=GateConfig, description="The promotion gate: what moves champion."
    )


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    newly_registered: bool


@dataclass(frozen=True)
class Promotion:
    champion_version: str
    promoted: bool
    reason: str
    compared_with: Scored | None = None  # the champion's scores the decision was made on


def weights_md5(model_dir: str) -> str:
    """md5 of the weights; CorruptArtifactError naming the file when they cannot be loaded
    (what from_pretrained would fail on with a traceback), before anything is logged."""
    path = Path(model_dir) / "model.safetensors"
    if problem := safetensors_problem(path):
        raise CorruptArtifactError(f"register: {problem}")
    return file_md5(path)


def _find_version(client: MlflowClient, name: str, weights: str) -> str | None:
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(WEIGHTS_TAG) == weights:
            return str(mv.version)
    return None


def register_model(
    model_dir: str,
    run_id: str,
    config: RegisterConfig,
    tags: dict[str, str],
    linked_metrics: tuple[str, ...] = (),
) -> ModelVersionRef:
    """Logs the transformers model (safetensors) in run_id and registers it, once per weights."""
    weights = weights_md5(model_dir)  # first: unreadable weights stop it before any request
    client = MlflowClient()
    existing = _find_version(client, config.model_name, weights)
    if existing is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model.generation_config.max_new_tokens = config.max_new_tokens
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                model_card=model_card(config.model_name, tags),  # no hub look-up
                # Pinned explicitly: inference would otherwise look for torchvision.
                pip_requirements=[
                    f"torch=={_version('torch')}",
                    f"transformers=={_version('transformers')}",
                ],
            )
        # Registered with every tag in the one request that creates the version: an outage
        # can leave a logged model without a version, never a version without its tags
        # (a retry finds it by WEIGHTS_TAG instead of registering a duplicate).
        registered = mlflow.register_model(
            info.model_uri, config.model_name, tags={**tags, WEIGHTS_TAG: weights}
        )
        existing = str(registered.version)
        # The pool and eval split as inputs beside the logged model, and its eval metrics
        # linked to it and the eval split (MLflow 3's LoggedModel entities). After the tags:
        # the weights tag is what a retry finds the version by.
        tracking.link_logged_model(
            run_id, info.model_id, ("eval.loss", "eval.perplexity", *linked_metrics)
        )
        newly = True
    else:
        newly = False
    client.set_registered_model_alias(config.model_name, CHALLENGER, existing)
    return ModelVersionRef(name=config.model_name, version=existing, newly_registered=newly)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


def _champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """model_name's @champion; None while there is none (no such registered model yet, or no
    version promoted). Any other registry error raises: it must never read as "no champion"."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException as error:
        missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(error)
        if error.error_code != "RESOURCE_DOES_NOT_EXIST" and not missing_alias:
            raise
        return None


def champion_version(model_name: str) -> tuple[str, str] | None:
    """model_name's @champion as (version, weights md5); None while there is none."""
    champion = _champion(MlflowClient(), model_name)
    if champion is None:
        return None
    return str(champion.version), champion.tags.get(WEIGHTS_TAG, "")


def champion_data_md5(model_name: str, version: str) -> str | None:
    """The DVC md5 of the data a version was trained on (its lineage tag)."""
    return MlflowClient().get_model_version(model_name, version).tags.get("dvc.md5")


def champion_run(model_name: str) -> str | None:
    """The MLflow run that trained model_name's current @champion; None while there is none."""
    champion = _champion(MlflowClient(), model_name)
    if champion is None:
        return None
    return champion.tags.get("mlflow.source_run") or champion.run_id


def _record(client: MlflowClient, name: str, version: str, scored: Scored) -> None:
    tags = {
        EVAL_LOSS: repr(scored.loss),
        EVAL_LOSS_STDERR: repr(scored.loss_stderr) if scored.loss_stderr is not None else "",
        EVAL_MD5: scored.eval_md5,
        BENCH_FINGERPRINT: scored.bench_fingerprint,
        BENCH_SCORES: scores_tag(scored.bench),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def recorded_scores(champion: ModelVersion) -> Scored:
    tags = champion.tags
    return Scored(
        loss=float(tags.get(EVAL_LOSS, "nan")),
        loss_stderr=float(tags[EVAL_LOSS_STDERR]) if tags.get(EVAL_LOSS_STDERR) else None,
        eval_md5=tags.get(EVAL_MD5, ""),
        bench_fingerprint=tags.get(BENCH_FINGERPRINT, ""),
        bench=parse_scores_tag(tags.get(BENCH_SCORES)),
    )


def comparable(recorded: Scored, ours: Scored) -> bool:
    """Same eval data and, when this run has benchmarks, the same tasks, versions and data."""
    same_bench = not ours.bench_fingerprint or recorded.bench_fingerprint == ours.bench_fingerprint
    return recorded.eval_md5 == ours.eval_md5 and same_bench and not math.isnan(recorded.loss)


def promote(
    version: ModelVersionRef,
    scored: Scored,
    score_champion: Callable[[str], Scored],
    gate: GateConfig | None = None,
    enabled: bool = True,
    base: Scored | None = None,
) -> Promotion:
    """Moves `champion` to the challenger when it beats the champion on gate.metric (see
    steps/registry/gate.py). The champion's recorded scores are reused when they were taken
    on this eval md5 and benchmark plan; otherwise score_champion(model_uri) re-scores it,
    so the comparison is always like for like. The decision is a tag on both versions.
    With no champion and gate.first_version=beat_base, `base` (the base model's scores on the
    same data and plan) is what the first version must beat."""
    gate = gate or GateConfig()
    client = MlflowClient()
    name = version.name
    _record(client, name, version.version, scored)
    champion = _champion(client, name)
    if champion is not None and str(champion.version) == version.version:
        return Promotion(version.version, False, "already champion")
    if not enabled:
        current = str(champion.version) if champion else "none"
        return Promotion(current, False, "promotion disabled (registry.promote=false)")
    ours = scored.measured(gate.metric)
    lower = lower_is_better(gate, scored.higher_is_better.get(gate.metric))
    if champion is None and gate.first_version == "beat_base":
        if base is None:  # never a silent "promote": the setting asked for a comparison
            raise ValueError(
                "registry.gate.first_version=beat_base: the base model's scores are needed to "
                "gate a first version, and none were given"
            )
        decision = decide(ours, base.measured(gate.metric), gate, lower, against="base model")
        return _apply(client, version, None, decision, base)
    if champion is None:
        reason = "first version: no champion yet"
        move_alias(client, name, CHAMPION, version.version, kind="auto", reason=reason,
                   numbers={gate.metric: ours.value})  # fmt: skip
        return Promotion(version.version, True, reason)
    theirs = recorded_scores(champion)
    if not comparable(theirs, scored):
        theirs = score_champion(f"models:/{name}@{CHAMPION}")
    decision = decide(ours, theirs.measured(gate.metric), gate, lower)
    return _apply(client, version, str(champion.version), decision, theirs)


def _apply(
    client: MlflowClient,
    version: ModelVersionRef,
    champion: str | None,
    decision: Decision,
    compared_with: Scored,
) -> Promotion:
    """The decision tagged and carried out: the alias moved, or the kept champion recorded
    (champion None: a first version measured against its base model)."""
    name = version.name
    _tag_decision(client, name, version.version, champion, decision)
    if decision.promote:
        move_alias(client, name, CHAMPION, version.version, kind="auto",
                   reason=decision.reason, numbers=decision.numbers)  # fmt: skip
        return Promotion(version.version, True, decision.reason, compared_with)
    record_kept(client, name, CHAMPION, version.version, reason=decision.reason,
                numbers=decision.numbers)  # fmt: skip
    return Promotion(champion or "none", False, decision.reason, compared_with)


def _tag_decision(
    client: MlflowClient, name: str, challenger: str, champion: str | None, decision: Decision
) -> None:
    """On the challenger: its gate decision; on the champion: the challenge it met (none
    where the challenger was measured against its base model)."""
    record = {"promoted": decision.promote, "reason": decision.reason, **decision.numbers}
    against = {**record, "against": champion or "base model"}
    client.set_model_version_tag(name, challenger, GATE_DECISION, json.dumps(against))
    if champion is not None:
        client.set_model_version_tag(name, champion,
                                     f"{GATE_DECISION}.challenged_by.v{challenger}",
                                     json.dumps(record))  # fmt: skip
