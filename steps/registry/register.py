"""Registry: log the fine-tuned model to MLflow, register a version, move aliases.

`challenger` always marks the newest version; `champion` moves only when the challenger's
eval loss beats the champion's on the same eval data (same DVC md5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps.hashing import file_md5

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
                registered_model_name=config.model_name,
                # Pinned explicitly: inference would otherwise look for torchvision.
                pip_requirements=[
                    f"torch=={_version('torch')}",
                    f"transformers=={_version('transformers')}",
                ],
            )
        existing = str(info.registered_model_version)
        for key, value in {**tags, WEIGHTS_TAG: weights}.items():
            client.set_model_version_tag(config.model_name, existing, key, value)
        newly = True
    else:
        newly = False
    client.set_registered_model_alias(config.model_name, CHALLENGER, existing)
    return ModelVersionRef(name=config.model_name, version=existing, newly_registered=newly)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


def champion_run(model_name: str) -> str | None:
    """The MLflow run that trained model_name's current @champion; None while there is none
    (no such registered model yet, or no version promoted)."""
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException as error:
        # A missing model or a missing alias means no champion yet; anything else is an error.
        missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(error)
        if error.error_code != "RESOURCE_DOES_NOT_EXIST" and not missing_alias:
            raise
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
    client.set_model_version_tag(name, version.version, "sift.eval_loss", repr(challenger_loss))
    client.set_model_version_tag(name, version.version, "sift.eval_md5", eval_md5)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is not None and str(champion.version) == version.version:
        return Promotion(version.version, False, "already champion")
    if not enabled:
        current = str(champion.version) if champion else "none"
        return Promotion(current, False, "promotion disabled (registry.promote=false)")
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return Promotion(version.version, True, "first version: no champion yet")
    if champion.tags.get("sift.eval_md5") == eval_md5:
        champion_loss = float(champion.tags["sift.eval_loss"])
    else:
        champion_loss = score_champion(f"models:/{name}@{CHAMPION}")
    if challenger_loss < champion_loss:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return Promotion(
            version.version,
            True,
            f"eval loss {challenger_loss:.4f} < champion's {champion_loss:.4f}",
        )
    return Promotion(
        str(champion.version),
        False,
        f"eval loss {challenger_loss:.4f} >= champion's {champion_loss:.4f}",
    )
