"""The pipeline's one typed config: a section per step, defaults in the step modules.

YAML files and --set key=value only override; an unknown key or a wrong type is an error
naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steps.embed import EmbedConfig
from steps.evaluate import EvalConfig
from steps.finetune import FinetuneConfig
from steps.ingest import IngestConfig
from steps.modeling import ModelConfig
from steps.register import RegisterConfig
from steps.select import SelectConfig
from steps.tracking import TrackingConfig
from steps.validate import ValidateConfig
from steps.version import VersionConfig


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: IngestConfig = Field(default_factory=IngestConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig)
    version: VersionConfig = Field(default_factory=VersionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


class ConfigError(ValueError):
    pass


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'select.budget=0.2' -> ('select.budget', 0.2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. select.budget=0.2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    for override in overrides or []:
        _set_dotted(tree, *parse_override(override))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        problems = "\n  ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        source = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{source}:\n  {problems}") from None


def resolve_paths(config: PipelineConfig, project_dir: Path) -> PipelineConfig:
    """Local paths in the config are relative to the project; make them absolute once."""

    def local(value: str) -> str:
        path = project_dir / value
        return str(path.resolve()) if not Path(value).is_absolute() and path.exists() else value

    return config.model_copy(
        update={
            "data": config.data.model_copy(
                update={
                    "source": local(config.data.source),
                    "eval_source": local(config.data.eval_source),
                }
            ),
            "model": config.model.model_copy(update={"name": local(config.model.name)}),
        }
    )


def flat_params(config: PipelineConfig) -> dict[str, object]:
    """section.key -> value, for MLflow params."""
    return {
        f"{section}.{key}": value
        for section, fields in config.model_dump().items()
        for key, value in fields.items()
    }
