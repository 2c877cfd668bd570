"""The pipeline and the CLI with model.name naming a GGUF file: converted once, trained,
registered, the version's lineage naming the GGUF and its md5; a bad file stops `sift run`
before anything."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from flows.config import load_config, resolve_paths
from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.hashing import file_md5
from steps.modeling import ModelConfig, model_source
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, small_run_overrides
from tests.gguf_files import write_gguf

MODEL_NAME = "sift-gguf"


@pytest.mark.slow
def test_a_run_on_a_gguf_base_trains_and_records_the_gguf_md5(prefect_harness, project: Path):
    from flows.pipeline import pipeline

    (project / "models").mkdir()
    gguf = write_gguf(MODEL_DIR, project / "models" / "stories260K.gguf")
    overrides = small_run_overrides(
        project,
        remote=project.parent / "remote",
        model_name=MODEL_NAME,
        tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}",
    )
    # project-relative, as a user's config names it
    config = resolve_paths(
        load_config(None, [*overrides, "model.name=models/stories260K.gguf"]), project
    )
    result = pipeline(config, project)

    md5 = file_md5(gguf)
    assert [p.name.split("-")[0] for p in (project / ".sift" / "gguf").iterdir()] == [md5]
    assert result.model_version == "1" and result.promoted
    assert result.eval_loss_finetuned < result.eval_loss_base
    # F32 GGUF: the base scored is the bundled folder model, loss for loss
    eval_table = next((project / ".sift" / "validated").glob("*/data/eval.parquet"))
    assert len(pd.read_parquet(eval_table)) > 0
    folder_base = evaluate(
        model_source(ModelConfig(name=str(MODEL_DIR))), str(eval_table), EvalConfig(), "cpu", "fp32"
    )
    assert result.eval_loss_base == folder_base.loss

    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    version = MlflowClient().get_model_version(MODEL_NAME, result.model_version)
    assert version.tags["model.base"] == str(gguf)
    assert version.tags["model.base_md5"] == md5
    served = mlflow.transformers.load_model(f"models:/{MODEL_NAME}@champion")
    assert served.model.config.hidden_size == 64 and "quantization_config" not in (
        served.model.config.to_dict()
    )


def _select(data: Path, out: Path, model: str):
    """`sift select` as tests/flows/test_cli.py runs it, on `model` (the bundled folder lies
    outside the project: ALLOW_REPO_ASSETS)."""
    args = ["select", "--data", str(data), "--out", str(out), "--set", f"model.name={model}",
            "--set", "model.device=cpu", "--set", "select.budget=8",
            "--set", ALLOW_REPO_ASSETS]  # fmt: skip
    return CliRunner().invoke(app, args)


@pytest.mark.slow
def test_select_on_a_gguf_picks_as_the_folder_model_in_the_gguf_md5s_space(
    project: Path, tmp_path: Path, monkeypatch
):
    """`sift select` works in the working directory: the conversion goes to its .sift/."""
    monkeypatch.chdir(project)
    (project / "models").mkdir()
    gguf = write_gguf(MODEL_DIR, project / "models" / "stories260K.gguf")
    data = project / "raw" / "train.jsonl"
    on_gguf = _select(data, tmp_path / "gguf" / "picked.json", "models/stories260K.gguf")
    assert on_gguf.exit_code == 0, on_gguf.output
    on_folder = _select(data, tmp_path / "folder" / "picked.json", str(MODEL_DIR))
    assert on_folder.exit_code == 0, on_folder.output
    picked, reference = (
        json.loads((tmp_path / kind / "picked.json").read_text()) for kind in ("gguf", "folder")
    )
    assert picked["ids"] == reference["ids"]  # identical logits, identical statistics
    assert picked["feature_space"].startswith(f"model={file_md5(gguf)} ")
    assert any((project / ".sift" / "gguf").glob(f"{file_md5(gguf)}-*"))


def test_run_with_a_truncated_gguf_exits_2_naming_it_before_anything(tmp_path: Path):
    gguf = write_gguf(MODEL_DIR, tmp_path / "m.gguf")
    gguf.write_bytes(gguf.read_bytes()[:-100])
    args = ["run", "--project-dir", str(tmp_path), "--set", "model.name=m.gguf"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"model.name '{gguf}' is truncated: its tensors end at byte" in result.output
    assert not (tmp_path / ".sift").exists() and not (tmp_path / "data.dvc").exists()
