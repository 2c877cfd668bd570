"""Lineage: the version tags, the run's config read back, the diff against the champion,
and the data.dvc commit that holds a data md5 (real git, real MLflow on SQLite)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.config import PipelineConfig, flat_params, load_config
from steps.data.version import DataVersion
from steps.evaluation.evaluate import EvalReport
from steps.registry.lineage import (
    LineageError,
    VersionRecord,
    as_overrides,
    changes,
    config_from_params,
    config_md5,
    data_rev,
    lineage_tags,
    reproduce_command,
    resolve_version,
)
from steps.tracking import GitState, git_state, source_tags

GIT = ["git", "-c", "user.name=sift-test", "-c", "user.email=sift@example.invalid"]
DATA = DataVersion("d" * 32 + ".dir", "t" * 32, "e" * 32, "data.dvc", None)


def _tags(config: PipelineConfig, url: str | None) -> dict[str, str]:
    return lineage_tags(
        run_id="run-1",
        config=config,
        base_model_md5="base-md5",
        data=DATA,
        git=GitState("abc123", dirty=True),
        flow_run_id="flow-1",
        flow_run_url=url,
        examples=20,
        prior_run="none",
        evaluation=EvalReport(loss=2.5, perplexity=12.18, tokens=900, examples=16),
        base_evaluation=EvalReport(loss=3.0, perplexity=20.09, tokens=900, examples=16),
    )


def test_lineage_tags_name_the_run_data_code_config_selection_flow_run_and_metrics():
    config = load_config(None, ["select.selector=uniform", "select.budget=0.25"])
    tags = _tags(config, "http://127.0.0.1:4200/flow-runs/flow-run/flow-1")
    assert tags == {
        "mlflow.source_run": "run-1",
        "model.base": config.model.name,
        "model.base_revision": "none",
        "model.base_md5": "base-md5",
        "dvc.md5": DATA.dir_md5,
        "dvc.train_md5": DATA.train_md5,
        "dvc.eval_md5": DATA.eval_md5,
        "git.sha": "abc123",
        "git.dirty": "true",
        "config.md5": config_md5(config),
        "select.selector": "uniform",
        "select.budget": "0.25",
        "select.examples": "20",
        "select.prior_run": "none",
        "prefect.flow_run_id": "flow-1",
        "prefect.flow_run_url": "http://127.0.0.1:4200/flow-runs/flow-run/flow-1",
        "eval.loss": "2.5",
        "eval.perplexity": "12.18",
        "eval.loss_base": "3.0",
        "eval.tokens": "900",
    }
    assert "prefect.flow_run_url" not in _tags(config, None)  # no server, no UI link


def test_config_md5_changes_with_any_value_and_only_then():
    assert config_md5(load_config()) == config_md5(load_config())
    assert config_md5(load_config()) != config_md5(load_config(None, ["eval.batch_tokens=3"]))


def test_a_runs_params_rebuild_the_same_config_types_included():
    config = load_config(
        None,
        [
            "select.prior='1234'",  # a str that looks like an int stays a str
            "select.budget=10",  # a float given as an int
            "model.revision=null",
            "model.trust_remote_code=true",
            'model.prompt_template="Q: {prompt}\\nA: "',  # a newline in a str
            "finetune.epochs=1",
            "registry.model_name=None-model",
        ],
    )
    logged = {key: str(value)[:6000] for key, value in flat_params(config).items()}  # as MLflow
    values = config_from_params(logged, PipelineConfig)
    assert values["select.prior"] == "1234" and values["model.revision"] is None
    assert load_config(None, as_overrides(values)) == config


def test_a_param_that_is_no_key_of_the_config_is_an_error_naming_it():
    with pytest.raises(LineageError, match=r"run param 'select\.old_knob' is not a key"):
        config_from_params({"select.old_knob": "3"}, PipelineConfig)
    with pytest.raises(LineageError, match=r"select\.budget='many'"):
        config_from_params({"select.budget": "many"}, PipelineConfig)


def test_the_reproduce_command_sets_only_non_defaults_and_rebuilds_the_config():
    config = load_config(None, ["select.budget=0.25", "finetune.epochs=1"])
    values = config_from_params({k: str(v) for k, v in flat_params(config).items()}, PipelineConfig)
    command = reproduce_command("f00d", values, PipelineConfig)
    assert command.startswith("sift run --data-rev f00d --set ")
    words = shlex.split(command)
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert sorted(s.partition("=")[0] for s in sets) == ["finetune.epochs", "select.budget"]
    assert load_config(None, sets) == config


def _record(version: str, tags=(), params=(), metrics=()) -> VersionRecord:
    """A champion-like record, with the given entries replacing or adding to its own."""
    return VersionRecord(
        version,
        tags={"dvc.md5": "m1", "dvc.train_md5": "t1", "dvc.eval_md5": "e1",
              "select.selector": "fisher", **dict(tags)},
        params={"select.budget": "0.1", "finetune.epochs": "1", **dict(params)},
        metrics={"eval.loss": 3.0, "finetune.train_loss": 3.5, **dict(metrics)},
    )  # fmt: skip


def test_changes_against_the_champion_name_data_config_selector_and_metric_deltas():
    champion = _record("1")
    this = _record(
        "2",
        tags={"dvc.md5": "m2", "dvc.train_md5": "t2", "select.selector": "uniform"},
        params={"select.budget": "0.2", "select.seed": "3"},
        metrics={"eval.loss": 2.75, "finetune.train_loss": 3.0},
    )
    diff = changes(this, champion)
    assert diff["champion_version"] == "1"
    assert diff["data"] == {
        "dvc.md5": {"champion": "m1", "this": "m2"},
        "dvc.train_md5": {"champion": "t1", "this": "t2"},
    }
    assert diff["config"] == {
        "select.budget": {"champion": "0.1", "this": "0.2"},
        "select.seed": {"champion": None, "this": "3"},
    }
    assert diff["selector"] == {"champion": "fisher", "this": "uniform"}
    assert diff["metrics"] == {"eval.loss": {"champion": 3.0, "this": 2.75, "delta": -0.25}}


def test_changes_of_an_identical_version_are_empty():
    diff = changes(_record("2"), _record("1"))
    assert diff["data"] == diff["config"] == diff["selector"] == {}
    assert diff["metrics"]["eval.loss"]["delta"] == 0.0


def _commit_pointer(repo: Path, md5: str, message: str) -> str:
    (repo / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  path: data\n")
    subprocess.run([*GIT, "add", "data.dvc"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", message], cwd=repo, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_data_rev_finds_the_commit_whose_data_dvc_holds_the_md5(tmp_path: Path, tmp_path_factory):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    first = _commit_pointer(tmp_path, "aaa.dir", "data v1")
    second = _commit_pointer(tmp_path, "bbb.dir", "data v2")
    (tmp_path / "README").write_text("later work\n")
    subprocess.run([*GIT, "add", "README"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "code"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert data_rev(tmp_path, "aaa.dir", []) == first
    assert data_rev(tmp_path, "bbb.dir", []) == second
    assert data_rev(tmp_path, "bbb.dir", ["HEAD"]) == head  # HEAD holds bbb too: preferred
    assert data_rev(tmp_path, "ccc.dir", ["HEAD", "no-such-rev"]) is None
    assert data_rev(tmp_path_factory.mktemp("plain"), "aaa.dir", []) is None  # no repo


def test_git_state_is_dirty_only_for_changes_to_tracked_files(tmp_path: Path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_state(tmp_path) == GitState("unknown", False)  # no commit yet
    sha = _commit_pointer(tmp_path, "aaa.dir", "data v1")
    (tmp_path / "untracked.txt").write_text("x")
    assert git_state(tmp_path) == GitState(sha, False)
    (tmp_path / "data.dvc").write_text("changed\n")
    assert git_state(tmp_path) == GitState(sha, True)
    tags = source_tags(git_state(tmp_path))
    assert tags["mlflow.source.git.commit"] == sha and tags["git.dirty"] == "true"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]


def test_resolve_version_names_the_missing_model_alias_or_version(tmp_path: Path, empty_store):
    uri = empty_store(tmp_path / "mlflow.db")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient()
        client.create_registered_model("m")
        client.create_model_version("m", source=(tmp_path / "model").as_uri())
        client.set_registered_model_alias("m", "challenger", "1")
        assert str(resolve_version(client, "m", "@challenger").version) == "1"
        assert str(resolve_version(client, "m", "1").version) == "1"
        cases = [
            ("nope", None, "registered model 'nope': not found"),
            ("m", None, r"m@champion: no such alias \(aliases: \['challenger'\]\)"),
            ("m", "7", "m version 7: no such version"),
            ("m", "latest", "version 'latest': expected a version number or @alias"),
        ]
        for name, ref, message in cases:
            with pytest.raises(LineageError, match=message):
                resolve_version(client, name, ref)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
