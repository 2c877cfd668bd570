"""The pipeline's one typed config: a section per step, defaults in the step modules.

YAML files and --set key=value only override; an unknown key or a wrong type is an error
naming the key. A config file is read only where it could have been named and under a size
and alias limit (steps/config_files.py); every local path a setting names is kept inside
data.allowed_roots by check_paths, before anything reads one or any run is tracked.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from flows.runtime import state_dir
from steps import config_files
from steps.chat_encoding import JINJA_SUFFIXES
from steps.data.ingest import IngestConfig, IngestError
from steps.data.validate import ValidateConfig
from steps.data.version import VersionConfig
from steps.evaluation.evaluate import EvalConfig
from steps.evaluation.task_paths import check_benchmark_paths
from steps.gguf import check_checkpoint, named_checkpoint, names_gguf
from steps.modeling import ModelConfig
from steps.paths import PathOutsideRoots, resolved_roots, tree_inside_roots
from steps.registry.register import RegisterConfig
from steps.selection.embedding.embed import EmbedConfig
from steps.selection.select import SelectConfig, check_embed_for
from steps.setting_paths import named_paths
from steps.study.study import StudyConfig
from steps.tracking import TrackingConfig
from steps.training.finetune import FinetuneConfig


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    skip_unchanged: bool = Field(
        default=False,
        description="Stop after validation when the data is the champion's (on in scheduled "
        "deployments: prefect.yaml, `sift serve`).",
    )


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: IngestConfig = Field(
        default_factory=IngestConfig,
        description="Ingest: where the pool and the eval split come from, their format, and which "
        "fields hold prompt and response or a conversation's turns.",
    )
    validation: ValidateConfig = Field(
        default_factory=ValidateConfig,
        description="Validate: the Great Expectations gate and what happens to rows that fail it.",
    )
    version: VersionConfig = Field(
        default_factory=VersionConfig,
        description="Version: the DVC remote the validated data is pushed to.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The base model, how examples are shown to it, and the hardware it runs on.",
    )
    embed: EmbedConfig = Field(
        default_factory=EmbedConfig,
        description="Embed: the forward pass that turns each example into selection statistics.",
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig,
        description="Select: which selector picks the training subset, its budget and warm start.",
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="Fine-tune: the training run on the selected examples (full or LoRA, one or "
        "more processes).",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Evaluate: held-out loss (always) and lm-eval benchmarks.",
    )
    registry: RegisterConfig = Field(
        default_factory=RegisterConfig,
        description="Register and promote: the MLflow registered model and the promotion gate.",
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Where MLflow records runs.",
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig,
        description="Scheduled runs (`sift serve`, `sift deploy`).",
    )

    @model_validator(mode="after")
    def _embed_serves_select(self) -> PipelineConfig:
        # At load time, so `sift run` stops before ingest and the embed pass, not at select.
        try:
            check_embed_for(self.select, self.embed)
        except ValueError as error:
            raise PydanticCustomError("embed_for_select", str(error)) from None
        return self

    @model_validator(mode="after")
    def _one_chat_template(self) -> PipelineConfig:
        # Prompt/response rows only: conversations are rendered by data.chat_template alone
        # (model.prompt_format shapes prompts). A template file renders conversations only.
        data = self.data
        named = data.chat_template is not None and self.model.prompt_format == "chat"
        template_file = str(data.chat_template).endswith(JINJA_SUFFIXES)
        if named and data.format not in ("messages", "sharegpt") and not template_file:
            raise PydanticCustomError(
                "two_chat_templates",
                "data.chat_template renders prompts at ingest and model.prompt_format=chat "
                "renders them again as they are shown to the model: set one of them (for "
                "conversations, set data.format messages or sharegpt)",
            )
        return self


class ConfigError(ValueError):
    pass


def parse_override(text: str) -> tuple[str, Any]:
    """'select.budget=0.2' -> ('select.budget', 0.2); the value is read as YAML."""
    try:
        return config_files.parse_override(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_config(
    path: Path | None = None, overrides: list[str] | None = None, project_dir: Path | None = None
) -> PipelineConfig:
    """Defaults, the YAML file, the overrides. The file may be anywhere it is named, but a
    symlink must lead where it could have been named: inside the project (project_dir, else
    the working directory) for a file named there, else inside the folder it is named in
    (steps/config_files.py check_config_location); at most MAX_CONFIG_BYTES, its aliases
    expanding to at most MAX_YAML_NODES."""
    parsed = [parse_override(override) for override in overrides or []]
    return config_files.load_model(
        PipelineConfig, path, parsed, ConfigError, project_dir=project_dir
    )


def resolve_paths(config: PipelineConfig, project_dir: Path) -> PipelineConfig:
    """Local paths in the config are relative to the project; make them absolute once."""

    def local(value: str) -> str:
        path = project_dir / value
        # absolute, links kept (not resolve()): check_paths names a link and its target
        exists = not Path(value).is_absolute() and path.exists()
        return os.path.abspath(path) if exists else value

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


DATA_SOURCES = ("data.source", "data.eval_source")


def check_paths(
    config: PipelineConfig | StudyConfig, project_dir: Path, skip: Collection[str] = ()
) -> None:
    """Every local path a setting names resolves, symlinks followed, inside data.allowed_roots
    (relative to project_dir), a folder with everything in it; else PathOutsideRoots (a
    ValueError; IngestError for the data sources, as ingest raises) naming the setting, the
    link and its target, before anything reads one or any run is tracked. Hub ids name
    nothing local and pass. skip: settings the caller does not read from the config: one a
    command's own option fills (`sift select --data`: a path its user chose on purpose), the
    data sources when --data-rev reads the data from DVC instead. A local GGUF checkpoint
    (model.name=*.gguf, model.gguf_file) is read too: a missing, truncated or foreign file
    or an architecture transformers cannot load is a GgufError (a ValueError) here."""
    roots = resolved_roots(config.data.allowed_roots, project_dir)
    for setting, value, working_dir_too in _path_settings(config):
        if setting in skip:
            continue
        for path in named_paths(value, project_dir, working_dir_too=working_dir_too):
            try:
                tree_inside_roots(path, roots, setting)
            except PathOutsideRoots as error:
                if setting in DATA_SOURCES:  # the type ingest's own check raises for them
                    raise IngestError(str(error)) from None
                raise
    if "model.name" not in skip:
        check_local_gguf(config.model, project_dir)
    check_benchmark_paths(config.eval, project_dir, roots)
    for path in named_paths(config.finetune.accelerate_config, project_dir, working_dir_too=True):
        # accelerate parses it: the same limits as a config of Sift's own
        config_files.read_yaml(path, "finetune.accelerate_config")


def check_local_gguf(model: ModelConfig, project_dir: Path) -> None:
    """The header of the GGUF file the model section names, read where model.name is found
    (project first, then the working directory, as check_paths looks); a missing file is
    an error. A hub repo's model.gguf_file is checked once fetched (steps/modeling.py
    model_source): nothing is downloaded here."""
    if not names_gguf(model.name, model.gguf_file):
        return
    found = named_paths(model.name, project_dir, working_dir_too=True)
    if not found and model.gguf_file is not None:
        return
    name = str(found[0]) if found else model.name
    checkpoint = named_checkpoint(name, model.gguf_file, model.revision)
    check_checkpoint(checkpoint, state_dir(project_dir))  # converted there: no config load


def _path_settings(config: PipelineConfig | StudyConfig) -> Iterator[tuple[str, str | None, bool]]:
    """(setting, value, whether its reader also opens it from the working directory): the
    settings that name a local file or folder Sift or a library it calls reads (or, for
    study.results_dir, writes into). version.remote_url and tracking.tracking_uri name
    where records are kept, often shared services, and are not confined."""
    data = config.data
    yield "data.source", data.source, data.loader == "datasets"
    yield "data.eval_source", data.eval_source, data.loader == "datasets"
    yield "data.chat_template", data.chat_template, True  # transformers: from the working dir
    yield "model.name", config.model.name, True
    yield "finetune.accelerate_config", config.finetune.accelerate_config, True
    if isinstance(config, PipelineConfig):
        yield "select.target", config.select.target, False
    else:
        yield "study.results_dir", config.study.results_dir, False


def flat_params(config: BaseModel) -> dict[str, object]:
    """section.key -> value, for MLflow params."""
    return {
        f"{section}.{key}": value
        for section, fields in config.model_dump().items()
        for key, value in fields.items()
    }
