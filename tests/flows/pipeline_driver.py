"""Runs the pipeline once and prints its Prefect task states as JSON, for tests that need a
separate process: one whose `steps`/`flows` code comes from PYTHONPATH (an edited copy).

    python tests/flows/pipeline_driver.py PROJECT_DIR key=value ...

No side effects at import: tests import task_states from here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from uuid import UUID


def task_states(flow_run_id: UUID) -> dict[str, set[str]]:
    """Task name (without Prefect's run suffix) → the state names its runs ended in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    states: dict[str, set[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], set()).add(run.state.name)
    return states


def main(project_dir: Path, overrides: list[str]) -> None:
    from flows.runtime import configure_environment

    configure_environment(project_dir)
    from flows.config import load_config, resolve_paths
    from flows.pipeline import pipeline

    config = resolve_paths(load_config(None, overrides), project_dir)
    state = pipeline(config, project_dir, return_state=True)
    result = state.result()
    states = task_states(state.state_details.flow_run_id)
    print(
        json.dumps(
            {
                "states": {name: sorted(names) for name, names in states.items()},
                "run_id": result.run_id,
                "eval_loss": result.eval_loss_finetuned,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
