"""The pipeline with model.name naming a GGUF file: converted once, trained, registered, and
the version's lineage names the GGUF and its md5."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config, resolve_paths
from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.hashing import file_md5
from steps.modeling import ModelConfig, model_source
from tests.conftest import MODEL_DIR, small_run_overrides
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
