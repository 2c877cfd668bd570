"""The pipeline's one typed config: a section per step, defaults in the step modules.

YAML files and --set key=value only override; an unknown key or a wrong type is an error
naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from steps import config_files
from steps.data.ingest import IngestConfig
from steps.data.validate import ValidateConfig
from steps.data.version import VersionConfig
from steps.evaluation.evaluate import EvalConfig
from steps.modeling import ModelConfig
from steps.registry.register import RegisterConfig
from steps.selection.embed import EmbedConfig
from steps.selection.select import SelectConfig, check_embed_for
from steps.tracking import TrackingConfig
from steps.training.finetune import FinetuneConfig


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Stop after validation when the data is the champion's (on in deployments: prefect.yaml).
    skip_unchanged: bool = False


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
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _embed_serves_select(self) -> PipelineConfig:
        # At load time, so `sift run` stops before ingest and the embed pass, not at select.
        try:
            check_embed_for(self.select, self.embed)
        except ValueError as error:
            raise PydanticCustomError("embed_for_select", str(error)) from None
        return self


class ConfigError(ValueError):
    pass


def parse_override(text: str) -> tuple[str, Any]:
    """'select.budget=0.2' -> ('select.budget', 0.2); the value is read as YAML."""
    try:
        return config_files.parse_override(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    parsed = [parse_override(override) for override in overrides or []]
    return config_files.load_model(PipelineConfig, path, parsed, ConfigError)


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


def flat_params(config: BaseModel) -> dict[str, object]:
    """section.key -> value, for MLflow params."""
    return {
        f"{section}.{key}": value
        for section, fields in config.model_dump().items()
        for key, value in fields.items()
    }
