"""The scale-out topology as processes (issue 16): PostgreSQL behind both servers that
`sift server up` starts, one S3 bucket (moto) as MLflow's artifact store and the DVC remote,
and one whole `sift run` through them that finds the servers from .sift/servers/state.json
alone. Then: no credential from the environment reached MLflow, Prefect, the bucket or a log.

Both `sift` commands run as executables with the environment a user's shell would have (AWS
variables included): the servers must outlive `up`, and `run` must read its settings at import.
Everything is gathered once (`stack`), the servers stopped and the databases dropped before
any assertion, so a failing check leaves nothing running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli.main import app
from flows.runtime import servers_state_path, state_dir
from tests.conftest import small_run_overrides, write_jsonl
from tests.flows.registry_servers import POSTGRES, clean_env, mlflow_client
from tests.s3 import REGION, moto_s3, object_keys, s3_client

SIFT = Path(sys.executable).parent / "sift"
BUCKET = "sift-stack"
MODEL_NAME = "sift-stack-model"
# Distinctive fakes (moto takes any): a substring search cannot match them by chance.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASIFTTESTKEY12345",
    "AWS_SECRET_ACCESS_KEY": "sift-secret-value-do-not-log-0123",
}
# The whole fixture took 90–140 s on a loaded 2-core machine (up ~20 s, the run most of it).
RUN_TIMEOUT_S = 600


@dataclass
class StackRun:
    """What one `up` → `run` → `down` left, gathered before the databases were dropped."""

    prefect_db: str
    mlflow_db: str
    endpoint: str = ""  # moto's, in version.endpoint_url: a config value that must be recorded
    up_output: str = ""
    run_output: str = ""
    down_output: str = ""
    lineage_output: str = ""  # `sift lineage`, which must also find the server in state.json
    rows: dict[str, list[tuple]] = field(default_factory=dict)  # query name → rows
    bucket_keys: list[str] = field(default_factory=list)
    dvc_dir_md5: str = ""
    run_id: str = ""
    flow_run_id: str = ""
    flow_run_state: str = ""
    leftovers: dict[str, bool] = field(default_factory=dict)  # local fallback store → exists
    # where → text, scanned for SECRETS: MLflow and Prefect through their APIs, whole
    # databases, every object in the bucket, logs, the record and the commands' output.
    texts: dict[str, str] = field(default_factory=dict)


def _admin():
    import psycopg2

    try:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 with trust auth for user postgres: {error}")
    connection.autocommit = True  # DROP DATABASE cannot run inside a transaction
    return connection


def _query(database: str, query: str, args: tuple = ()) -> list[tuple]:
    import psycopg2

    connection = psycopg2.connect(dbname=database, connect_timeout=5, **POSTGRES)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall()
    finally:
        connection.close()  # before the database is dropped


def _database_text(database: str) -> str:
    """Every row of every table, as PostgreSQL prints a row: secrets anywhere show up."""
    tables = _query(database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return "\n".join(
        str(row[0])
        for (table,) in tables
        for row in _query(database, f'SELECT t::text FROM public."{table}" t')
    )


def _sift(args: list[str], project: Path, env: dict[str, str], timeout: int) -> tuple[int, str]:
    """A `sift` command as typed in a shell in the project, with env as its environment."""
    done = subprocess.run([str(SIFT), *args, "--project-dir", str(project)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _api_texts(found: StackRun, servers: dict) -> None:
    """The run, registered model, versions and logged models from the MLflow API, and the
    flow run's parameters and logs from the Prefect API, into found."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    client = mlflow_client(servers["mlflow"]["client_url"])
    experiment = client.get_experiment_by_name("sift")
    assert experiment is not None, "no MLflow experiment 'sift' on the server"
    (run,) = client.search_runs([experiment.experiment_id])
    found.run_id, found.flow_run_id = run.info.run_id, run.data.tags["prefect.flow_run_id"]
    found.texts["MLflow run params"] = json.dumps(run.data.params)
    found.texts["MLflow run tags"] = json.dumps(run.data.tags)
    model = client.get_registered_model(MODEL_NAME)
    found.texts["MLflow registered model tags"] = json.dumps(model.tags)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    found.texts["MLflow model version tags"] = json.dumps([v.tags for v in versions])
    logged = client.search_logged_models([experiment.experiment_id])
    found.texts["MLflow logged model params and tags"] = json.dumps(
        [[m.params, m.tags] for m in logged]
    )
    with SyncPrefectClient(servers["prefect"]["client_url"]) as prefect:
        flow_run = prefect.read_flow_run(uuid.UUID(found.flow_run_id))
        ids = LogFilterFlowRunId(any_=[flow_run.id])
        logs = prefect.read_logs(LogFilter(flow_run_id=ids))
    found.flow_run_state = flow_run.state.type.value if flow_run.state else ""
    found.texts["Prefect flow run parameters"] = json.dumps(flow_run.parameters, default=str)
    found.texts["Prefect flow run logs"] = "\n".join(log.message for log in logs)


def _store_rows(found: StackRun) -> None:
    """The rows the assertions read, straight from the two databases."""
    queries = {
        "runs": (found.mlflow_db, "SELECT run_uuid, status FROM runs"),
        "model_versions": (found.mlflow_db, "SELECT name, version, run_id FROM model_versions"),
        "aliases": (found.mlflow_db, "SELECT name, alias, version FROM registered_model_aliases"),
        "flow_runs": (found.prefect_db, "SELECT id::text, state_type::text FROM flow_run"),
        "task_runs": (found.prefect_db, "SELECT DISTINCT state_type::text FROM task_run"),
    }
    found.rows = {name: _query(db, query) for name, (db, query) in queries.items()}
    for database in (found.prefect_db, found.mlflow_db):
        found.texts[f"PostgreSQL database {database}"] = _database_text(database)


def _bucket(found: StackRun, endpoint: str) -> None:
    found.bucket_keys = object_keys(endpoint, BUCKET)
    s3 = s3_client(endpoint)
    for key in found.bucket_keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        found.texts[f"s3://{BUCKET}/{key}"] = body.decode("latin-1")  # bytes, one char each


def _local_files(found: StackRun, project: Path) -> None:
    found.leftovers = {
        "mlflow/mlflow.db": (project / "mlflow" / "mlflow.db").exists(),
        ".sift/prefect/prefect.db": (state_dir(project) / "prefect" / "prefect.db").exists(),
        ".sift/dvc-remote": (state_dir(project) / "dvc-remote").exists(),
    }
    outs = yaml.safe_load((project / "data.dvc").read_text())["outs"]
    found.dvc_dir_md5 = outs[0]["md5"]
    files = [*(state_dir(project) / "servers").glob("*.log"), *(project / ".dvc").glob("config*")]
    for path in files:
        found.texts[str(path.relative_to(project))] = path.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gsm8k_train, gsm8k_test) -> Iterator[StackRun]:
    admin = _admin()
    # A repo as the `project` fixture makes (that fixture is per test; this run is shared),
    # on the half slice the other server tests run: what is checked is where things land.
    project = tmp_path_factory.mktemp("stack")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[:40])
    write_jsonl(project / "raw" / "test.jsonl", gsm8k_test[:8])
    base = f"sift_stack_{uuid.uuid4().hex[:10]}"
    found = StackRun(prefect_db=f"{base}_prefect", mlflow_db=f"{base}_mlflow")
    try:
        with moto_s3(BUCKET) as endpoint:
            found.endpoint = endpoint
            env = clean_env() | SECRETS | {"AWS_DEFAULT_REGION": REGION,
                                           "MLFLOW_S3_ENDPOINT_URL": endpoint,
                                           "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
            server_settings = [
                f"server.database_url=postgresql://{POSTGRES['user']}@{POSTGRES['host']}:"
                f"{POSTGRES['port']}/{base}",
                f"server.artifacts_uri=s3://{BUCKET}/mlflow",
            ]
            code, found.up_output = _sift(
                ["server", "up", *(f"--set={item}" for item in server_settings)], project, env, 300
            )
            assert code == 0, f"sift server up failed:\n{found.up_output}"
            found.texts["sift server up output"] = found.up_output
            found.texts["state.json"] = servers_state_path(project).read_text()
            servers = json.loads(found.texts["state.json"])["servers"]
            # No tracking.tracking_uri: the run must find the MLflow server in state.json.
            small = small_run_overrides(project, remote=Path("-"), model_name=MODEL_NAME,
                                        tracking_uri="", budget="8")  # fmt: skip
            overrides = [
                *(item for item in small if not item.startswith(("tracking.", "version."))),
                f"version.remote_url=s3://{BUCKET}/dvc",
                f"version.endpoint_url={endpoint}",
            ]
            code, found.run_output = _sift(
                ["run", *(f"--set={item}" for item in overrides)], project, env, RUN_TIMEOUT_S
            )
            assert code == 0, f"sift run failed:\n{found.run_output[-6000:]}"
            found.texts["sift run output"] = found.run_output
            code, found.lineage_output = _sift(["lineage", MODEL_NAME], project, env, 300)
            assert code == 0, f"sift lineage failed:\n{found.lineage_output}"
            _api_texts(found, servers)
            found.down_output = (
                CliRunner().invoke(app, ["server", "down", "--project-dir", str(project)]).output
            )
            _store_rows(found)
            _bucket(found, endpoint)
            _local_files(found, project)
    finally:
        from flows import servers as server_commands

        server_commands.down(project)  # a no-op once `down` ran
        with admin.cursor() as cursor:
            for name in (found.prefect_db, found.mlflow_db):
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    yield found


@pytest.mark.slow
@pytest.mark.services
def test_one_run_keeps_its_runs_models_and_flow_run_in_postgresql_and_its_files_in_s3(stack):
    stores = next(line for line in stack.up_output.splitlines() if line.startswith("stores:"))
    assert f"@127.0.0.1:5432/{stack.prefect_db} and " in stores, stores
    assert f"postgresql://postgres@127.0.0.1:5432/{stack.mlflow_db};" in stores, stores
    assert f"artifacts s3://{BUCKET}/mlflow" in stack.up_output
    assert (stack.run_id, "FINISHED") in stack.rows["runs"]
    assert stack.rows["model_versions"] == [(MODEL_NAME, 1, stack.run_id)]
    assert sorted(stack.rows["aliases"]) == [(MODEL_NAME, "challenger", 1),
                                             (MODEL_NAME, "champion", 1)]  # fmt: skip
    # The run used the servers of state.json, not the project's embedded stores.
    assert stack.leftovers == dict.fromkeys(stack.leftovers, False)
    assert stack.rows["flow_runs"] == [(stack.flow_run_id, "COMPLETED")]
    assert stack.flow_run_state == "COMPLETED"
    assert stack.rows["task_runs"] == [("COMPLETED",)]

    mlflow_keys = [key for key in stack.bucket_keys if key.startswith("mlflow/")]
    assert any(key.endswith("/model/model.safetensors") for key in mlflow_keys), mlflow_keys
    assert any(key.endswith("/MLmodel") for key in mlflow_keys), mlflow_keys
    assert any(f"/{stack.run_id}/artifacts/report/" in key for key in mlflow_keys), mlflow_keys
    md5 = stack.dvc_dir_md5
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in stack.bucket_keys
    assert not [k for k in stack.bucket_keys if not k.startswith(("mlflow/", "dvc/"))]

    for name, entry in json.loads(stack.texts["state.json"])["servers"].items():
        assert f"{name} server (pid {entry['pid']}) stopped" in stack.down_output
    # Read-only commands find the MLflow server too: the champion's run on PostgreSQL.
    assert stack.run_id in stack.lineage_output, stack.lineage_output


@pytest.mark.slow
@pytest.mark.services
def test_no_credential_from_the_environment_is_recorded_anywhere(stack):
    expected = {"MLflow run params", "MLflow run tags", "MLflow registered model tags",
                "MLflow model version tags", "Prefect flow run parameters",
                f"PostgreSQL database {stack.mlflow_db}", "sift run output"}  # fmt: skip
    assert expected <= set(stack.texts)
    # The scanned texts hold the config (moto's URL is version.endpoint_url), not nothing.
    for where in ("MLflow run params", "Prefect flow run parameters"):
        assert stack.endpoint in stack.texts[where], where
    leaks = [
        f"{name} in {where}"
        for where, text in stack.texts.items()
        for name, secret in SECRETS.items()
        if secret in text
    ]
    assert not leaks, "\n".join(leaks)
