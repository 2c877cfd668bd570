"""Process-level settings that must exist before Prefect, DVC or MLflow are imported.

Prefect reads PREFECT_HOME and its result path once, at import; setting them later is
silently ignored (docs/stack-notes.md). Values already in the environment win, so pointing
PREFECT_API_URL / MLFLOW_TRACKING_URI at servers needs no code change.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(project_dir: Path) -> Path:
    """Everything Sift writes that is not versioned: caches, staged data, trained models."""
    return project_dir / ".sift"


def configure_environment(project_dir: Path) -> None:
    state = state_dir(project_dir).resolve()
    (state / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    defaults = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(state / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The ephemeral API's 20 s start-up limit was missed on a loaded 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
