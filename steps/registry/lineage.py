"""Lineage: what a registered version carries back to its data, code, config, flow run and
base model, read back as one chain (`sift lineage`), compared with the champion, and turned
into the config and command that reproduce it.

Written once, at registration, as version tags (`lineage_tags`); read from the version's
tags and its source run's params and metrics, so nothing needs the files of the machine
that trained it except the git history that holds `data.dvc`.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, TypeAdapter, ValidationError

from steps.data.version import DataVersion
from steps.evaluation.evaluate import EvalReport
from steps.modeling import ModelConfig
from steps.registry.register import CHAMPION, WEIGHTS_TAG
from steps.selection.select import SelectConfig
from steps.tracking import GitState

DVC_FILE = "data.dvc"


class LineageError(ValueError):
    """A model, version, alias or run that is not there; the message names it."""


class RunConfig(Protocol):
    """The parts of the pipeline's config the tags name (flows.config.PipelineConfig)."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def select(self) -> SelectConfig: ...
    def model_dump_json(self) -> str: ...


def config_md5(config: RunConfig) -> str:
    """md5 of the resolved config's JSON: two versions with one hash ran one config."""
    return hashlib.md5(config.model_dump_json().encode()).hexdigest()


def lineage_tags(
    *,
    run_id: str,
    config: RunConfig,
    base_model_md5: str,
    data: DataVersion,
    git: GitState,
    flow_run_id: str,
    flow_run_url: str | None,
    examples: int,
    prior_run: str,
    evaluation: EvalReport,
    base_evaluation: EvalReport,
) -> dict[str, str]:
    """The registered version's tags: its run, base model, data, code, config, selection,
    flow run and eval metrics. flow_run_url: None without a Prefect server (no UI)."""
    tags = {
        "mlflow.source_run": run_id,
        "model.base": config.model.name,
        "model.base_revision": config.model.revision or "none",
        "model.base_md5": base_model_md5,  # steps.modeling.model_source: a GGUF's file md5
        "dvc.md5": data.dir_md5,
        "dvc.train_md5": data.train_md5,
        "dvc.eval_md5": data.eval_md5,
        "git.sha": git.sha,
        "git.dirty": str(git.dirty).lower(),
        "config.md5": config_md5(config),
        "select.selector": config.select.selector,
        # the key in use: select.budget, or select.budget_tokens (a budget of loss tokens)
        config.select.budget_setting[0]: f"{config.select.budget_setting[1]:g}",
        "select.examples": str(examples),
        "select.prior_run": prior_run,
        "prefect.flow_run_id": flow_run_id,
        # repr: the float read back is the float measured
        "eval.loss": repr(evaluation.loss),
        "eval.perplexity": repr(evaluation.perplexity),
        "eval.loss_base": repr(base_evaluation.loss),
        "eval.tokens": str(evaluation.tokens),
    }
    if config.model.gguf_file:  # the file inside model.base (a folder or hub repo) it was
        tags["model.base_gguf_file"] = config.model.gguf_file
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    return tags


# --- the config a run was made with ------------------------------------------------------


def config_from_params(params: dict[str, str], schema: type[BaseModel]) -> dict[str, Any]:
    """A run's params (flows.config.flat_params, each logged as str(value)) back to typed
    values, `section.key` → value, checked against schema's field types."""
    return {dotted: _typed_value(schema, dotted, raw) for dotted, raw in sorted(params.items())}


def config_from_run(run_id: str, schema: type[BaseModel]) -> dict[str, Any]:
    """The config an MLflow run recorded, as `section.key` → value: `as_overrides` turns it
    into `--set` items that rebuild the same config (flows.config.load_config)."""
    return config_from_params(_run(MlflowClient(), run_id).data.params, schema)


def _typed_value(schema: type[BaseModel], dotted: str, raw: str) -> Any:
    section, _, key = dotted.partition(".")
    field = schema.model_fields.get(section)
    section_type = field.annotation if field else None
    if not (isinstance(section_type, type) and issubclass(section_type, BaseModel)) or (
        key not in section_type.model_fields
    ):
        raise LineageError(f"run param {dotted!r} is not a key of today's config")
    annotation = section_type.model_fields[key].annotation
    adapter: TypeAdapter[Any] = TypeAdapter(Any if annotation is None else annotation)
    # str(None) is "None"; a str field's str() is itself; anything else is a Python literal.
    attempts: list[tuple[Any, bool]] = [(raw, True)]
    if raw == "None":
        attempts.insert(0, (None, False))
    with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
        attempts.append((ast.literal_eval(raw), False))
    for candidate, strict in attempts:
        try:
            value = adapter.validate_python(candidate, strict=strict)
        except ValidationError:
            continue
        # a nested section (registry.gate) as plain data, as model_dump() gives the defaults
        return value.model_dump() if isinstance(value, BaseModel) else value
    raise LineageError(f"run param {dotted}={raw!r} does not fit today's config field")


def _yaml_text(value: Any) -> str:
    """value as `--set` reads it back (YAML); plain when the plain text reads back the same."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # JSON is YAML


def as_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={_yaml_text(value)}" for key, value in values.items()]


def reproduce_command(data_rev: str | None, values: dict[str, Any], schema: type[BaseModel]) -> str:
    """`sift run --data-rev REV --set ...` with the keys that differ from the defaults."""
    defaults = {
        f"{section}.{key}": value
        for section, fields in schema().model_dump().items()
        for key, value in fields.items()
    }
    changed = {key: value for key, value in values.items() if defaults.get(key) != value}
    parts = ["sift", "run", *(["--data-rev", data_rev] if data_rev else [])]
    for item in as_overrides(changed):
        parts += ["--set", item]
    return shlex.join(parts)


# --- data.dvc in git ---------------------------------------------------------------------


def data_rev(project_dir: Path, dir_md5: str, preferred: list[str]) -> str | None:
    """The commit whose data.dvc names dir_md5: the first of `preferred` (the run's own
    commit, its --data-rev) that does, else the newest such commit; None when none does."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=project_dir, capture_output=True, text=True, check=False
        )
        return result.stdout if result.returncode == 0 else ""

    history = git("log", "--format=%H", "--", DVC_FILE).split()
    for rev in [*preferred, *history]:
        sha = git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}").strip()
        text = git("show", f"{sha}:{DVC_FILE}") if sha else ""
        try:
            outs = (yaml.safe_load(text) or {}).get("outs") or [{}]
        except yaml.YAMLError:
            continue
        if outs[0].get("md5") == dir_md5:
            return sha
    return None


# --- reading a version back --------------------------------------------------------------


@dataclass(frozen=True)
class VersionRecord:
    """A registered version as the diff reads it: its tags, its run's params and metrics."""

    version: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def changes(this: VersionRecord, champion: VersionRecord) -> dict[str, Any]:
    """What differs from the champion: data md5s, config keys, selector, eval metrics
    (with this − champion); an empty section means the same."""

    def pair(a: object, b: object) -> dict[str, object]:
        return {"champion": b, "this": a}

    data = {
        key: pair(this.tags.get(key), champion.tags.get(key))
        for key in ("dvc.md5", "dvc.train_md5", "dvc.eval_md5")
        if this.tags.get(key) != champion.tags.get(key)
    }
    config = {
        key: pair(this.params.get(key), champion.params.get(key))
        for key in sorted(this.params.keys() | champion.params.keys())
        if this.params.get(key) != champion.params.get(key)
    }
    selector = (this.tags.get("select.selector"), champion.tags.get("select.selector"))
    metrics = {
        key: {**pair(this.metrics[key], champion.metrics[key]),
              "delta": this.metrics[key] - champion.metrics[key]}
        for key in sorted(this.metrics.keys() & champion.metrics.keys())
        if key.startswith("eval.")
    }  # fmt: skip
    return {
        "champion_version": champion.version,
        "data": data,
        "config": config,
        "selector": pair(*selector) if selector[0] != selector[1] else {},
        "metrics": metrics,
    }


def _run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LineageError(
            f"run {run_id!r}: no such MLflow run at {mlflow.get_tracking_uri()}"
        ) from None


def resolve_version(client: MlflowClient, name: str, ref: str | None) -> ModelVersion:
    """`N` (a version number) or `@alias` (default @champion) of registered model `name`."""
    ref = ref or f"@{CHAMPION}"
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LineageError(
            f"registered model {name!r}: not found at {mlflow.get_registry_uri()}"
        ) from None
    aliases = dict(registered.aliases or {})
    if ref.startswith("@"):
        if ref[1:] not in aliases:
            raise LineageError(f"{name}{ref}: no such alias (aliases: {sorted(aliases) or 'none'})")
        return client.get_model_version(name, str(aliases[ref[1:]]))
    if not ref.isdigit():
        raise LineageError(f"version {ref!r}: expected a version number or @alias")
    try:
        return client.get_model_version(name, ref)
    except MlflowException:
        raise LineageError(f"{name} version {ref}: no such version") from None


def _record(client: MlflowClient, version: ModelVersion) -> tuple[VersionRecord, Any]:
    run_id = version.tags.get("mlflow.source_run") or version.run_id
    if not run_id:
        raise LineageError(f"{version.name} version {version.version}: no source run")
    run = _run(client, run_id)
    record = VersionRecord(
        str(version.version), dict(version.tags), dict(run.data.params), dict(run.data.metrics)
    )
    return record, run


def _logged_model_id(version: ModelVersion) -> str | None:
    """The LoggedModel a version was registered from: the OSS stores keep no model_id
    column, and record it as the version's source instead (models:/<model id>)."""
    source = version.source or ""
    if version.model_id:
        return version.model_id
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _reproduce(rev: str | None, params: dict[str, str], schema: type[BaseModel]) -> str:
    try:
        return reproduce_command(rev, config_from_params(params, schema), schema)
    except LineageError as error:  # a run from an older config: say why there is no command
        return f"not reproducible with today's config: {error}"


def lineage(name: str, ref: str | None, project_dir: Path, schema: type[BaseModel]) -> dict:
    """The chain version → run → data (md5s, the data.dvc commit, the reproducing command)
    → code → flow run → base model, and what changed against the champion, as JSON-ready
    values. schema: the pipeline's config class (the run's params are read against it)."""
    client = MlflowClient()
    version = resolve_version(client, name, ref)
    this, run = _record(client, version)
    tags, run_tags = this.tags, run.data.tags

    def tag(key: str) -> str | None:
        return tags.get(key) or run_tags.get(key)

    git_sha = tag("git.sha")
    md5 = tag("dvc.md5")
    preferred = [r for r in (run_tags.get("dvc.data_rev"), git_sha) if r and r != "unknown"]
    rev = data_rev(project_dir, md5, preferred) if md5 else None
    aliases = {
        alias: str(v) for alias, v in (client.get_registered_model(name).aliases or {}).items()
    }
    report: dict[str, Any] = {
        "model": {
            "name": name,
            "version": this.version,
            "aliases": sorted(a for a, v in aliases.items() if v == this.version),
            "model_id": _logged_model_id(version),
            "weights_md5": tags.get(WEIGHTS_TAG),
        },
        "run": {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status},
        "data": {
            "md5": md5,
            "train_md5": tag("dvc.train_md5"),
            "eval_md5": tag("dvc.eval_md5"),
            "data_rev": rev,
            "reproduce": _reproduce(rev, this.params, schema),
        },
        "code": {"git_sha": git_sha, "dirty": tag("git.dirty")},
        "flow_run": {"id": tag("prefect.flow_run_id"), "url": tag("prefect.flow_run_url")},
        "base_model": {"id": tags.get("model.base"), "md5": tags.get("model.base_md5")},
        "selection": {
            "selector": tag("select.selector"),
            "budget": tags.get("select.budget"),
            "budget_tokens": tags.get("select.budget_tokens"),
            "examples": tags.get("select.examples"),
            "prior_run": tag("select.prior_run"),
        },
        "config_md5": tags.get("config.md5"),
        "metrics": {k: v for k, v in sorted(this.metrics.items()) if k.startswith("eval.")},
        "champion": None,
    }
    if CHAMPION in aliases:
        champion, _ = _record(client, client.get_model_version(name, aliases[CHAMPION]))
        report["champion"] = changes(this, champion)
    return report
