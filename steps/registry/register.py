"""Registry: log the fine-tuned model to MLflow, register a version, move aliases.

`challenger` always marks the newest version; `champion` moves only when the challenger's
eval loss beats the champion's on the same eval data (same DVC md5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps import tracking
from steps.hashing import file_md5
from steps.registry.aliases import EVAL_LOSS, EVAL_MD5, move_alias, record_kept

CHALLENGER, CHAMPION = "challenger", "champion"
# Identifies a model's weights, so a cached re-run finds its version instead of adding one.
WEIGHTS_TAG = "sift.weights_md5"


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = "sift-gsm8k"
    # False: register and tag challenger, but never move champion (e.g. for manual review).
    promote: bool = True
    max_new_tokens: int = 128  # generation default stored with the model (MLflow needs one)


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


def weights_md5(model_dir: str) -> str:
    return file_md5(Path(model_dir) / "model.safetensors")


def _find_version(client: MlflowClient, name: str, weights: str) -> str | None:
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(WEIGHTS_TAG) == weights:
            return str(mv.version)
    return None


def register_model(
    model_dir: str, run_id: str, config: RegisterConfig, tags: dict[str, str]
) -> ModelVersionRef:
    """Logs the transformers model (safetensors) in run_id and registers it, once per weights."""
    client = MlflowClient()
    weights = weights_md5(model_dir)
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
        tracking.link_logged_model(run_id, info.model_id, ("eval.loss", "eval.perplexity"))
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


def champion_run(model_name: str) -> str | None:
    """The MLflow run that trained model_name's current @champion; None while there is none."""
    champion = _champion(MlflowClient(), model_name)
    if champion is None:
        return None
    return champion.tags.get("mlflow.source_run") or champion.run_id


def promote(
    version: ModelVersionRef,
    challenger_loss: float,
    eval_md5: str,
    score_champion: Callable[[str], float],
    enabled: bool = True,
) -> Promotion:
    """Moves `champion` to the challenger if it has a lower eval loss on the same eval data.

    The champion's recorded loss is reused when it was measured on this eval md5; otherwise
    score_champion(model_uri) re-scores it, so the comparison is always like for like.
    """
    client = MlflowClient()
    name = version.name
    client.set_model_version_tag(name, version.version, EVAL_LOSS, repr(challenger_loss))
    client.set_model_version_tag(name, version.version, EVAL_MD5, eval_md5)
    champion = _champion(client, name)
    if champion is not None and str(champion.version) == version.version:
        return Promotion(version.version, False, "already champion")
    if not enabled:
        current = str(champion.version) if champion else "none"
        return Promotion(current, False, "promotion disabled (registry.promote=false)")
    if champion is None:
        reason = "first version: no champion yet"
        numbers = {"eval_loss": challenger_loss}
        move_alias(
            client, name, CHAMPION, version.version, kind="auto", reason=reason, numbers=numbers
        )
        return Promotion(version.version, True, reason)
    if champion.tags.get(EVAL_MD5) == eval_md5:
        champion_loss = float(champion.tags[EVAL_LOSS])
    else:
        champion_loss = score_champion(f"models:/{name}@{CHAMPION}")
    # Both losses on this eval data: what the audit history shows the decision was made on.
    numbers = {"eval_loss": challenger_loss, "previous_eval_loss": champion_loss}
    if challenger_loss < champion_loss:
        reason = f"eval loss {challenger_loss:.4f} < champion's {champion_loss:.4f}"
        move_alias(
            client, name, CHAMPION, version.version, kind="auto", reason=reason, numbers=numbers
        )
        return Promotion(version.version, True, reason)
    reason = f"eval loss {challenger_loss:.4f} >= champion's {champion_loss:.4f}"
    record_kept(client, name, CHAMPION, version.version, reason=reason, numbers=numbers)
    return Promotion(str(champion.version), False, reason)
