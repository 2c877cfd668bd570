"""Prefect cache policies and work-folder keys shared by the flows.

A cached task is keyed on its inputs, its wrapper's source (TASK_SOURCE), the run context's
device and precision, and the source of the step code it runs (`StepCode`): that stage's
module and every `steps` module it imports, so an edit to the embedding code re-embeds and
an edit to the registry code re-embeds nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from steps.hashing import code_fingerprint


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


def cached(*modules: str) -> CachePolicy:
    """The policy of a cached task that runs the step code in `modules`."""
    return (INPUTS - "context") + TASK_SOURCE + ContextKey() + StepCode(modules=modules)


def key(*parts: object) -> str:
    """A short stable folder name for one combination of inputs."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
