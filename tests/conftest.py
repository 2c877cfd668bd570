"""Shared fixtures. Environment first: Prefect reads its settings once, at import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "assets" / "models" / "stories260K"
GSM8K_DIR = REPO / "assets" / "data" / "gsm8k"
# The bundled model and eval slices live in this checkout, outside a test's tmp project:
# every local path a setting names must lie in data.allowed_roots (flows/config.py check_paths).
REPO_ASSETS_ROOTS = [".", "assets", str(REPO / "assets")]
ALLOW_REPO_ASSETS = f"data.allowed_roots={json.dumps(REPO_ASSETS_ROOTS)}"

_STATE = Path(tempfile.mkdtemp(prefix="sift-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
from flows.runtime import configure_environment  # noqa: E402

configure_environment(_STATE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding slow tests run first, quick ones after (each file's own order kept).

    `make test` hands whole files to two pytest-xdist workers in this order
    (--dist loadfile --no-loadscope-reorder): the quick files then fill whichever worker
    finishes first, instead of a minute-long file starting last and running alone. xdist's
    own reorder (most tests first) did the opposite: files of one slow test came last."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable


def read_jsonl(path: Path, rows: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(next(handle)) for _ in range(rows)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_pool_features(out_dir: Path, n: int = 40, d: int = 6, seed: int = 0):
    """A small random pool on disk as the embed step leaves it (FILES + a table of ids
    ex-0..ex-{n-1}): what select_subset reads. Returns (FeaturesRef, table path)."""
    import numpy as np
    import pandas as pd

    from steps.selection.embedding.embed import FILES, FeaturesRef
    from steps.selection.pool import pool_from_tokens

    rng = np.random.default_rng(seed)
    states = [rng.standard_normal((int(t), d)) for t in rng.integers(1, 3 * d, size=n)]
    pool = pool_from_tokens(states, base_loss=rng.random(n).astype(np.float32))
    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True)
    for name in FILES:
        np.save(features_dir / f"{name}.npy", getattr(pool, name))
    table_path = out_dir / "pool.parquet"
    pd.DataFrame({"id": [f"ex-{i}" for i in range(n)]}).to_parquet(table_path)
    tokens = int(pool.n_tokens.sum())
    return FeaturesRef(str(features_dir), n, d, tokens, 0.0, hidden_size=d), str(table_path)


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


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store whose schema MLflow created once for the session: making
    a store runs every schema migration, seconds on a loaded machine (~8 s seen on 2 cores)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()  # the tracking tables
    client.search_registered_models()  # the registry's (the same migrations; both checked)
    return path


@pytest.fixture
def empty_store(migrated_store: Path):
    """empty_store(path) → the URI of a new, empty MLflow store at path: a copy of the
    session's migrated one, so a test that only needs a store of its own does not wait for
    the migrations (tests that are about creating a store create theirs)."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_store, path)
        return f"sqlite:///{path}"

    return make


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


def small_run_overrides(
    project: Path,
    *,
    remote: Path,
    model_name: str,
    tracking_uri: str,
    budget: str = "0.25",
    benchmarks: bool = False,
) -> list[str]:
    """--set items of a small real pipeline run on the `project` fixture's GSM8K slice and the
    bundled model: one epoch, so a flow test takes seconds of training. The held-out loss is
    always evaluated; the benchmark suite only with `benchmarks` (quick, 5 documents per
    task), for the tests about benchmarks: it is most of a small run's time otherwise."""
    suite = [
        "eval.limit=5",
        f"eval.data_dir={REPO / 'assets' / 'eval'}",  # also for copies of the code elsewhere
    ]
    return [
        f"data.source={project / 'raw' / 'train.jsonl'}",
        f"data.eval_source={project / 'raw' / 'test.jsonl'}",
        f"model.name={MODEL_DIR}",
        ALLOW_REPO_ASSETS,
        f"select.budget={budget}",
        "finetune.epochs=1",
        "finetune.batch_size=8",
        f"version.remote_url={remote}",
        f"registry.model_name={model_name}",
        f"tracking.tracking_uri={tracking_uri}",
        *(suite if benchmarks else ["eval.suite=none"]),
    ]


def shifted_model_copy(path: Path, shift: float) -> str:
    """The bundled model saved to `path` with its output layer shifted by `shift`: distinct
    weights (so a distinct registry version) of a real model, in seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    with torch.no_grad():
        model.lm_head.weight.add_(shift)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(path)
    return str(path)
