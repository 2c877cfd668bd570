"""`sift lineage` on a real pipeline run, and the version reproduced from its lineage alone."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from flows.config import PipelineConfig, load_config, resolve_paths
from steps.modeling import model_fingerprint
from steps.registry.lineage import as_overrides, config_from_run, config_md5
from tests.conftest import MODEL_DIR, small_run_overrides

DVC = str(Path(sys.executable).parent / "dvc")  # the venv's, activated or not
GIT = ["git", "-c", "user.name=sift-test", "-c", "user.email=sift@example.invalid"]
MODEL_NAME = "sift-lineage"
runner = CliRunner()


def _config(project: Path):
    return resolve_paths(
        load_config(
            None,
            small_run_overrides(
                project,
                remote=project.parent / "remote",
                model_name=MODEL_NAME,
                tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}",
            ),
        ),
        project,
    )


def _commit(repo: Path, paths: list[str], message: str) -> str:
    subprocess.run([*GIT, "add", *paths], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", message], cwd=repo, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def _lineage(project: Path, store: str, *args: str):
    return runner.invoke(
        app,
        [
            "lineage",
            *args,
            "--project-dir",
            str(project),
            "--set",
            f"tracking.tracking_uri={store}",
        ],
    )


def _picks(store: str, run_id: str, out_dir: Path) -> list[str]:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="selection/selection.json",
        dst_path=str(out_dir),
        tracking_uri=store,
    )
    return list(json.loads(Path(path).read_text())["ids"])


@pytest.mark.slow
def test_lineage_names_data_code_and_run_and_the_version_reproduces_from_it(
    prefect_harness, project: Path, tmp_path_factory
):
    from flows.pipeline import pipeline

    subprocess.run([DVC, "init", "-q"], cwd=project, check=True)  # it stages its own files
    dvc_files = [".dvc/config", ".dvc/.gitignore", ".dvcignore"]
    code_sha = _commit(project, ["raw", *dvc_files], "the project before its first run")
    config = _config(project)
    store = config.tracking.tracking_uri
    first = pipeline(config, project)
    data_sha = _commit(project, ["data.dvc", ".gitignore"], "data for run 1")

    result = _lineage(project, store, MODEL_NAME, "@champion", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pointer_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert report["data"]["md5"] == first.data_md5 == pointer_md5
    assert report["data"]["data_rev"] == data_sha
    assert report["data"]["reproduce"].startswith(f"sift run --data-rev {data_sha} --set ")
    assert report["code"] == {"git_sha": code_sha, "dirty": "false"}
    assert report["run"]["id"] == first.run_id
    assert report["model"]["version"] == first.model_version
    assert report["model"]["aliases"] == ["challenger", "champion"]
    assert report["base_model"] == {"id": str(MODEL_DIR), "md5": model_fingerprint(config.model)}
    assert report["flow_run"]["url"].endswith(f"/flow-runs/flow-run/{report['flow_run']['id']}")
    assert report["selection"]["selector"] == "fisher-label"
    assert report["selection"]["examples"] == "20"
    assert report["metrics"]["eval.loss"] == pytest.approx(first.eval_loss_finetuned)
    assert report["champion"]["champion_version"] == first.model_version

    text = _lineage(project, store, MODEL_NAME)  # default @champion, human-readable
    assert text.exit_code == 0, text.output
    assert f"dvc md5 {first.data_md5}" in text.stdout and f"git {code_sha} (clean)" in text.stdout
    assert "vs champion: this version is the champion" in text.stdout

    # What MLflow's UI reads: standard source tags, and the logged model's linked entities.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run(first.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == code_sha
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    model_id = report["model"]["model_id"]
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
    eval_md5 = run.data.tags["dvc.eval_md5"]
    assert logged["eval.loss"].value == pytest.approx(first.eval_loss_finetuned)
    assert (logged["eval.loss"].dataset_name, logged["eval.loss"].dataset_digest) == (
        "eval",
        eval_md5[:36],
    )
    version = client.get_model_version(MODEL_NAME, first.model_version)
    rebuilt = load_config(None, as_overrides(config_from_run(first.run_id, PipelineConfig)))
    assert config_md5(rebuilt) == version.tags["config.md5"] == config_md5(config)

    # Reproduce from the lineage alone: a clone of the project, its DVC remote, and the
    # printed command (data rev + config), into a registry of its own.
    fresh = tmp_path_factory.mktemp("reproduce") / "project"
    subprocess.run(["git", "clone", "-q", str(project), str(fresh)], check=True)
    remote = rebuilt.version.remote_url
    subprocess.run([DVC, "remote", "add", "--local", "-d", "sift", remote], cwd=fresh, check=True)
    words = shlex.split(report["data"]["reproduce"])
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    fresh_store = f"sqlite:///{fresh.parent / 'mlflow.db'}"
    again_config = load_config(None, [*sets, f"tracking.tracking_uri={fresh_store}"])
    again = pipeline(again_config, fresh, data_rev=words[words.index("--data-rev") + 1])

    assert again.data_md5 == first.data_md5
    picks_dir = tmp_path_factory.mktemp("picks")
    first_picks = _picks(store, first.run_id, picks_dir / "first")
    assert _picks(fresh_store, again.run_id, picks_dir / "again") == first_picks
    fresh_client = MlflowClient(tracking_uri=fresh_store, registry_uri=fresh_store)
    again_version = fresh_client.get_model_version(MODEL_NAME, again.model_version)
    assert again_version.tags["sift.weights_md5"] == version.tags["sift.weights_md5"]


@pytest.fixture
def store(tmp_path: Path, empty_store) -> str:
    """A real MLflow store holding one registered model with one version (no champion)."""
    uri = empty_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=(tmp_path / "model").as_uri())
    return uri


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "registered model 'nope': not found"),
        (["m"], "m@champion: no such alias (aliases: none)"),
        (["m", "@staging"], "m@staging: no such alias"),
        (["m", "9"], "m version 9: no such version"),
        (["m", "v1"], "version 'v1': expected a version number or @alias"),
    ],
)
def test_a_bad_name_version_or_alias_exits_1_with_one_line_naming_it(
    tmp_path: Path, store: str, args: list[str], message: str
):
    database = tmp_path / "mlflow.db"
    before = database.read_bytes()
    result = _lineage(tmp_path, store, *args)
    assert result.exit_code == 1
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert message in result.stdout
    assert database.read_bytes() == before  # a lookup changes nothing


def test_lineage_without_a_store_exits_1_and_creates_none(tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    result = _lineage(tmp_path, store, "sift-gsm8k")
    assert result.exit_code == 1
    assert f"no MLflow store at {store} (tracking.tracking_uri)" in result.stdout
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / ".sift").exists()
