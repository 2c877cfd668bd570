"""Shared fixtures. Environment first: Prefect reads its settings once, at import."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "assets" / "models" / "stories260K"
GSM8K_DIR = REPO / "assets" / "data" / "gsm8k"

_STATE = Path(tempfile.mkdtemp(prefix="sift-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
from flows.runtime import configure_environment  # noqa: E402

configure_environment(_STATE)


def read_jsonl(path: Path, rows: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(next(handle)) for _ in range(rows)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def gsm8k_train() -> list[dict]:
    return read_jsonl(GSM8K_DIR / "train.jsonl", 80)


@pytest.fixture(scope="session")
def gsm8k_test() -> list[dict]:
    return read_jsonl(GSM8K_DIR / "test.jsonl", 16)


@pytest.fixture
def project(tmp_path: Path, gsm8k_train, gsm8k_test) -> Path:
    """A fresh git repo with a small real GSM8K slice, as a user's project would be."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    write_jsonl(tmp_path / "raw" / "train.jsonl", gsm8k_train)
    write_jsonl(tmp_path / "raw" / "test.jsonl", gsm8k_test)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness():
    """One real (temporary) Prefect API for the whole session: it takes seconds to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def new_run_id(experiment_name: str) -> str:
    """A fresh MLflow run id, without mlflow.set_experiment: that sets a process-wide active
    experiment which later tests' start_run(run_id=...) would then be checked against."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    )
    return client.create_run(experiment_id).info.run_id
