"""Prefect cache policies and work-folder keys shared by the flows.

A cached task is keyed on its inputs, its wrapper's source (TASK_SOURCE), the run context's
device and precision, and the source of the step code it runs (`StepCode`): that stage's
module and every `steps` module it imports, so an edit to the embedding code re-embeds and
an edit to the registry code re-embeds nothing.

A key says what went in, not that the files a cached result names are still whole: `healed`
checks them before a hit is used and runs the task again when they are not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from steps.hashing import code_fingerprint, file_md5
from steps.modeling import ModelSource


@dataclass
class StepCode(CachePolicy):
    """Keys on the source of `modules` and the `steps` modules they import (TASK_SOURCE sees
    only the thin wrapper in flows/, not the step it calls)."""

    modules: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str:
        return code_fingerprint(*self.modules)


@dataclass
class ContextKey(CachePolicy):
    """Keys on the parts of the `context` input that change results (RunContext.cache_key):
    device and precision, never the MLflow run id, which is new every run."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str | None:
        context = (inputs or {}).get("context")
        return None if context is None else context.cache_key()


@dataclass
class TrainedWeights(CachePolicy):
    """Keys on the md5 of a fine-tuned model's weights (the `model` input). Its ModelSource
    fingerprint is only its folder's name (steps.modeling.trained_source), so without this a
    folder whose weights were rebuilt or replaced would get the scores of the old ones. A base
    model's fingerprint is a content hash already (model_fingerprint): no second hash."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str | None:
        source = (inputs or {}).get("model")
        if not isinstance(source, ModelSource):
            return None
        folder = Path(source.config.name)
        weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if source.fingerprint != folder.name or not weights:
            return None
        return ":".join(file_md5(path) for path in weights)


def healed(task: Task, problem: Callable[[Any], str | None]) -> Callable[..., Any]:
    """`task`, whose cached result is checked with `problem` before it is used: a hit whose
    files are damaged (problem returns the line naming them) is run again, with that line as
    a warning on the console, and its new result replaces the cached one.

    How, in Prefect 3.8.8: a cache hit is the task's state named "Cached"; the task itself
    never runs then, so the check is here, on the returned state. `refresh_cache=True` makes
    the task's transaction overwrite the record under the same key (task_engine.py,
    transaction_context), so the next run hits the rebuilt result. A key over the files'
    content would not do: it is computed before the task runs, when a first run has no
    output yet, so the second run's key would always differ from the first one's.
    """

    def run(**inputs: Any) -> Any:
        state = task(**inputs, return_state=True)
        result = state.result()  # raises the task's error, as a plain call does
        if state.name != "Cached":
            return result  # computed just now: the step checked what it wrote
        found = problem(result)
        if found is None:
            return result
        get_run_logger().warning("%s: the cached result is damaged: %s; running it again",
                                 task.name, found)  # fmt: skip
        return task.with_options(refresh_cache=True)(**inputs)

    return run


def cached(*modules: str) -> CachePolicy:
    """The policy of a cached task that runs the step code in `modules`."""
    return (INPUTS - "context") + TASK_SOURCE + ContextKey() + StepCode(modules=modules)


def key(*parts: object) -> str:
    """A short stable folder name for one combination of inputs."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
