"""The CUDA path on the real stories260K model: a bf16 embed pass and bf16 training steps
(skipped without a GPU)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from steps.modeling import ModelConfig
from steps.selection.embed import EmbedConfig, embed_pool, load_pool
from steps.training.finetune import FinetuneConfig, finetune
from tests.conftest import MODEL_DIR, new_run_id
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"
    ),
]


def _losses_on_cuda(table: tuple[str, list[str]], out_dir: Path, precision: str) -> list[float]:
    """Per-step training losses of 6 steps on CUDA; asserts the run logged CUDA memory."""
    path, ids = table
    run_id = new_run_id("finetune-gpu")
    config = FinetuneConfig(epochs=1, batch_size=4, logging_steps=1, checkpoint_steps=0)
    ref = finetune(path, ids, MODEL, config, out_dir, "cuda", precision, run_id)
    client = MlflowClient()
    assert ref.steps == 6
    # MlflowStepLogger records peak memory only when the Trainer's device is CUDA.
    assert client.get_metric_history(run_id, "train/cuda_max_memory_gb"), "did not run on CUDA"
    return [m.value for m in client.get_metric_history(run_id, "train/loss")]


def test_bf16_training_on_cuda_is_finite_decreasing_and_close_to_fp32(gsm8k_train, tmp_path):
    table = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    bf16 = _losses_on_cuda(table, tmp_path / "bf16", "bf16")
    fp32 = _losses_on_cuda(table, tmp_path / "fp32", "fp32")
    assert len(bf16) == 6 and all(math.isfinite(loss) for loss in bf16)
    assert bf16[-1] < bf16[0] - 1.0  # the CPU golden run goes 6.84 -> 4.01 in these steps
    # bf16 autocast rounds the matmuls: not the fp32 numbers, but near them.
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, abs=0.25)


def test_a_bf16_embed_pass_on_cuda_is_close_to_fp32_and_names_its_precision(gsm8k_train, tmp_path):
    path, _ = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    config = EmbedConfig(chunk_examples=8)
    bf16 = embed_pool(path, MODEL, config, tmp_path / "bf16", "cuda", "bf16")
    fp32 = embed_pool(path, MODEL, config, tmp_path / "fp32", "cuda", "fp32")
    assert (bf16.precision, fp32.precision) == ("bf16", "fp32")
    a, b = load_pool(fp32).pooled, load_pool(bf16).pooled  # mean states: no sign ambiguity
    assert np.isfinite(b).all() and not np.array_equal(a, b)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
