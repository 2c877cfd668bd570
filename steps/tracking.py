"""MLflow plumbing shared by the steps: where runs go, and what every run records.

Runs are addressed by explicit run ids (MLflow's active run is thread-local, and Prefect
runs tasks in worker threads), so nothing here relies on a global "current run".
"""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import DatasetInput, LoggedModelInput, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

LIBRARIES = ("torch", "transformers", "prefect", "mlflow", "dvc", "great-expectations", "numpy")


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow store; null: $MLFLOW_TRACKING_URI if set, else SQLite at "
        "mlflow/mlflow.db. A server such as http://mlflow:5000 works the same.",
    )
    experiment: str = Field(default="sift", description="MLflow experiment runs are logged to.")
    # A remote down for a few seconds up to ~a minute is survived; one that stays down fails
    # the task with its error once the last wait is over.
    remote_retry_delays: tuple[float, ...] = Field(
        default=(5.0, 15.0, 30.0),
        description="Seconds to wait before each retry of a task that talks to a remote (the "
        "MLflow registry, the DVC remote); one retry per entry, [] for none.",
    )


def resolve_tracking_uri(config: TrackingConfig, project_dir: Path) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # Absolute path: a relative sqlite URI would follow the working directory.
    return f"sqlite:///{(project_dir / 'mlflow' / 'mlflow.db').resolve()}"


def sqlite_store_path(tracking_uri: str) -> Path | None:
    """The file of a SQLite store URI; None for any other store (a server, PostgreSQL)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])


def require_store(tracking_uri: str) -> None:
    """ValueError when a SQLite store's file is missing: opening it would create an empty one
    (a typo would leave a stray mlflow.db), and a read-only command must change nothing."""
    path = sqlite_store_path(tracking_uri)
    if path is not None and not path.is_file():
        raise ValueError(
            f"no MLflow store at {tracking_uri} (tracking.tracking_uri): `sift run` creates it"
        )


class MissingStoreError(ValueError):
    """The SQLite store file is gone but the runs it recorded left artifacts behind."""


def artifact_root(project_dir: Path) -> Path:
    """Where runs tracked in a SQLite store keep their artifacts (experiment_id)."""
    return project_dir / "mlflow" / "artifacts"


def prepare_store(tracking_uri: str, project_dir: Path, new_store: bool = False) -> None:
    """Creates a missing SQLite store, unless earlier runs' artifacts show one existed: a
    deleted or mistyped mlflow.db would otherwise start an empty registry (its versions and
    alias history gone, old artifacts orphaned, v1 promoted again). `new_store` says that a
    new store is what the user wants."""
    path = sqlite_store_path(tracking_uri)
    if path is None or path.is_file():
        return
    artifacts = artifact_root(project_dir)
    if not new_store and _holds_files(artifacts):
        raise MissingStoreError(
            f"no MLflow store at {path}, but {artifacts} holds artifacts of runs it recorded: "
            "a new store would lose their registry versions and alias history. Point "
            "tracking.tracking_uri (or MLFLOW_TRACKING_URI) at the store that recorded them, "
            "or pass --new-store to start an empty one"
        )
    _create_sqlite_store(path, artifacts)


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def _create_sqlite_store(path: Path, artifacts: Path) -> None:
    """Creates the store's tables in a file of this process's own, then links it into place:
    MLflow migrates an empty file on first open, and two first runs migrating one file at once
    failed ('no such column: spans.dimension_attributes'). The link fails if another run's
    store got there first, which is then the store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{scratch}", artifacts.resolve().as_uri())
        store.engine.dispose()  # closes the file before it changes name
        with contextlib.suppress(FileExistsError):  # another run's store is there: it is the store
            os.link(scratch, path)  # atomic, and never replaces an existing file
    finally:
        scratch.unlink(missing_ok=True)


def use_tracking(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def experiment_id(name: str, project_dir: Path) -> str:
    """Gets or creates the experiment; local stores keep artifacts under mlflow/artifacts."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = artifact_root(project_dir).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException as error:
        # Another run created it between the lookup and the create (two first runs at once).
        created = client.get_experiment_by_name(name)
        if error.error_code != "RESOURCE_ALREADY_EXISTS" or created is None:
            raise
        return created.experiment_id


@dataclass(frozen=True)
class GitState:
    """The commit the code ran from and whether tracked files differed from it."""

    sha: str  # "unknown" outside a git repo or before the first commit
    dirty: bool


def git_state(project_dir: Path) -> GitState:
    # Untracked files do not count: .sift/, mlflow/ and raw inputs sit untracked in most
    # projects, and a tree that is "dirty" on every run says nothing.
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=project_dir, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--verify", "-q", "HEAD")
    if not sha:
        return GitState("unknown", False)
    return GitState(sha, bool(git("status", "--porcelain", "--untracked-files=no")))


def os_user() -> str:
    """The OS user; a container uid with no passwd entry records the uid (getpass raises
    OSError or, before Python 3.13, KeyError there): not worth a failed run."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def source_tags(git: GitState) -> dict[str, str]:
    """MLflow's standard run tags, which its UI shows as Source and Created by
    (mlflow.utils.mlflow_tags; the fluent start_run sets them, client.create_run does not)."""
    # A Prefect worker or `flow.serve` runs a deployment's flow run in a process it starts
    # with PREFECT__FLOW_RUN_ID set: that is a scheduled job, anything else a local command.
    job = bool(os.environ.get("PREFECT__FLOW_RUN_ID"))
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv[0] else "python"
    tags = {
        "mlflow.source.name": "sift serve (Prefect deployment)" if job else command,
        "mlflow.source.type": "JOB" if job else "LOCAL",
        "mlflow.user": os_user(),
        "git.dirty": str(git.dirty).lower(),
    }
    if git.sha != "unknown":
        tags["mlflow.source.git.commit"] = git.sha
    return tags


def library_versions() -> dict[str, str]:
    return {f"version.{name}": version(name) for name in LIBRARIES}


@contextmanager
def tracked_run(
    project_dir: Path,
    config: TrackingConfig,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, object],
    new_store: bool = False,
) -> Iterator[str]:
    """An MLflow run recording config, code and libraries, open for the body: it ends FAILED
    with an `error` tag when the body raises an error, KILLED when it is stopped from outside
    (a signal, Ctrl-C, a Prefect cancellation: BaseExceptions that are not Exceptions),
    FINISHED otherwise. A missing SQLite store is created (prepare_store, `new_store`)."""
    tracking_uri = resolve_tracking_uri(config, project_dir)
    prepare_store(tracking_uri, project_dir, new_store)
    use_tracking(tracking_uri)
    client = MlflowClient()
    git = git_state(project_dir)
    run = client.create_run(
        experiment_id(config.experiment, project_dir),
        run_name=run_name,
        tags={
            "git.sha": git.sha,
            **source_tags(git),
            **library_versions(),
            **tags,
        },
    )
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:6000])
    try:
        yield run_id
    except BaseException as error:
        _end_run(run_id, error)
        raise
    _end_run(run_id)


def _end_run(run_id: str, error: BaseException | None = None) -> None:
    client = MlflowClient()
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    if error is None:
        status = RunStatus.FINISHED
    else:
        status = RunStatus.FAILED if isinstance(error, Exception) else RunStatus.KILLED
    client.set_terminated(run_id, RunStatus.to_string(status))


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))


def log_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifact(run_id: str, path: str, artifact_dir: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, path, artifact_dir)


def download_selection(run_id: str, dst_dir: Path, setting: str) -> Path:
    """An earlier pipeline run's selection/ artifacts (selection.json, design.npy, and
    label_design.npy when it logged one) into dst_dir; returns the selection.json path.
    ValueError naming `setting` when the run is missing or has no design.npy (runs from
    before selections recorded their design). A missing label_design.npy is fisher-label's
    concern only (steps/selection/greedy/warm_start.py label_prior_for)."""
    client = MlflowClient()
    _existing_run(client, run_id, setting)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "selection")}
    if not {"selection.json", "design.npy"} <= logged:
        raise ValueError(
            f"{setting}={run_id!r}: the run has no selection/design.npy to warm-start from "
            f"(it logged {sorted(logged) or 'no selection'}; runs from before selections "
            "recorded their design cannot be priors)"
        )
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="selection", dst_path=str(dst_dir)
    )
    return Path(local) / "selection.json"


def _existing_run(client: MlflowClient, run_id: str, setting: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(
            f"{setting}={run_id!r}: no such MLflow run at {mlflow.get_tracking_uri()}"
        ) from None


def download_run_selection(run_id: str, dst_dir: Path, setting: str) -> tuple[Path, dict[str, str]]:
    """A pipeline run's selection/selection.json, downloaded into dst_dir, and the run's tags
    (dvc.train_md5: the validated pool it selected from). ValueError naming `setting` when
    the run is missing or logged no selection."""
    client = MlflowClient()
    run = _existing_run(client, run_id, setting)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "selection")}
    if "selection.json" not in logged:
        raise ValueError(
            f"{setting}={run_id!r}: the run logged no selection/selection.json (it stopped "
            "before selecting, or skipped unchanged data)"
        )
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="selection/selection.json", dst_path=str(dst_dir)
    )
    return Path(local), dict(run.data.tags)


def log_dataset(run_id: str, table_path: str, name: str, digest: str, context: str) -> None:
    """mlflow.log_input with the DVC md5 as digest (MLflow rejects dvc:// sources, so the
    source is the file path; the md5 ties it to the DVC version)."""
    frame = pd.read_parquet(table_path)
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=table_path, name=name, digest=digest[:36])
    with mlflow.start_run(run_id=run_id):
        for attempt in range(3):
            try:
                mlflow.log_input(dataset, context=context, tags={"dvc.md5": digest})
                return
            except MlflowException as error:
                # Two runs logging the same dataset at once: MLflow's store looks the dataset
                # up, then inserts it, and the slower insert breaks the unique key (name,
                # digest) per experiment. Logged again, the lookup finds the other's row.
                if "unique constraint" not in str(error).lower() or attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))


def link_logged_model(run_id: str, model_id: str, metric_keys: Sequence[str]) -> None:
    """MLflow 3's linked entities for a model logged in run_id: the run's datasets (the
    training pool and eval split from log_dataset) are logged again together with the model
    as inputs, and metric_keys are logged again linked to the model and the eval dataset, so
    the logged model's page lists them with the dataset they were measured on.

    The client form of `mlflow.log_input(dataset, context, model=LoggedModelInput(id))` and
    `mlflow.log_metric(key, value, model_id=..., dataset=...)`; MLflow keeps one input per
    dataset digest, so the datasets are not duplicated on the run.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    inputs = run.inputs.dataset_inputs if run.inputs else []
    client.log_inputs(
        run_id,
        datasets=[DatasetInput(i.dataset, i.tags) for i in inputs] or None,
        models=[LoggedModelInput(model_id)],
    )
    evaluation = next(
        (
            i.dataset
            for i in inputs
            if any(t.key == "mlflow.data.context" and t.value == "evaluation" for t in i.tags)
        ),
        None,
    )
    for key in metric_keys:
        if key in run.data.metrics:
            client.log_metric(
                run_id,
                key,
                run.data.metrics[key],
                model_id=model_id,
                dataset_name=evaluation.name if evaluation else None,
                dataset_digest=evaluation.digest if evaluation else None,
            )
