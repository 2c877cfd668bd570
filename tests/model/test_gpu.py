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
from steps.selection.embedding.embed import EmbedConfig, embed_pool, load_pool
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: one per embed process")
def test_a_bf16_embed_pass_in_two_gpu_processes_equals_one_process(gsm8k_train, tmp_path):
    path, _ = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    config = EmbedConfig(chunk_examples=8)  # 3 chunks: GPU 0 computes two, GPU 1 one
    one = embed_pool(path, MODEL, config, tmp_path / "one", "cuda", "bf16")
    two_processes = config.model_copy(update={"num_processes": 2})
    two = embed_pool(path, MODEL, two_processes, tmp_path / "two", "cuda", "bf16")
    log = (tmp_path / "two" / "launch" / "workers.log").read_text()
    assert "(nccl, cuda:0)" in log and "(nccl, cuda:1)" in log
    a, b = load_pool(one), load_pool(two)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
    for name in ("factors", "pooled", "base_loss"):  # the same kernels on the same GPU model
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [48, 320])  # 320: the numpy design screens in float32 too
def test_the_torch_backend_on_cuda_picks_what_numpy_picks(d: int) -> None:
    from steps.selection.greedy.settings import GreedySettings
    from steps.selection.pool import pool_from_tokens
    from steps.selection.selectors import plain_greedy_fisher, select

    rng = np.random.default_rng(d)
    scale = (1.0 + np.arange(d)) ** -0.75
    states = [
        (rng.standard_normal(d) + rng.standard_normal((t, d))) * scale
        for t in rng.integers(1, 2 * d, size=120)
    ]
    pool = pool_from_tokens([*states, states[3], states[3]])  # an exact tie
    a = rng.standard_normal((3 * d, d)) * 0.1
    prior = a.T @ a
    plain = plain_greedy_fisher(pool, 30, prior=prior)
    resident = select(pool, 30, "fisher", prior=prior, backend="torch", device="cuda")
    streamed = GreedySettings(device_memory_mb=1)  # factors gathered per batch, tiny batches
    small = select(
        pool, 30, "fisher", prior=prior, backend="torch", device="cuda", settings=streamed
    )
    numpy = select(pool, 30, "fisher", prior=prior)
    for run in (resident, small, numpy):
        np.testing.assert_array_equal(run.order, plain.order)
        np.testing.assert_allclose(run.objective, plain.objective, rtol=1e-10)
    per_token = select(pool, 2000, "fisher-per-token", prior=prior, backend="torch", device="cuda")
    np.testing.assert_array_equal(
        per_token.order, select(pool, 2000, "fisher-per-token", prior=prior).order
    )
