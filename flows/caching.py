"""Prefect cache policy and folder keys shared by the flows."""

import hashlib
import json
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

import steps


class StepsSource(CachePolicy):
    """Keys on the source of the whole steps/ package: TASK_SOURCE sees only the thin task
    wrappers in flows/, so an edit to a step's code would otherwise be served stale results."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        files = sorted(Path(steps.__file__).parent.glob("*.py"))
        return hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()


# Inputs + code; the MLflow run id is per run and must not split the cache.
CACHED = (INPUTS + TASK_SOURCE + StepsSource()) - "run_id"


def key(*parts: object) -> str:
    """A short stable folder name for one combination of inputs."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
