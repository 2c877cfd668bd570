"""Data-parallel fine-tuning in 2 CPU processes (accelerate launch, gloo), as CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from steps.modeling import ModelConfig
from steps.training.finetune import FinetuneConfig, NonFiniteLossError, finetune
from tests.conftest import MODEL_DIR, new_run_id
from tests.model.conftest import DIVERGING, write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = pytest.mark.slow


def test_two_processes_train_one_model_and_log_once(gsm8k_train, tmp_path: Path):
    train_path, ids = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    run_id = new_run_id("finetune-multiprocess")
    config = FinetuneConfig(
        epochs=2, batch_size=4, logging_steps=1, checkpoint_steps=2, num_processes=2
    )
    out_dir = tmp_path / "ddp"
    ref = finetune(train_path, ids, MODEL, config, out_dir, "cpu", "fp32", run_id)
    # 24 examples over 2 processes × 4 per batch = 3 optimizer steps per epoch (1 process: 6).
    assert ref.steps == 6 and ref.run_id == run_id
    assert 0 < ref.final_loss < ref.train_loss < 7.5
    assert ref.processes == 2
    losses = MlflowClient().get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]  # rank 0 logs, once per step
    AutoModelForCausalLM.from_pretrained(ref.model_dir, use_safetensors=True)
    assert not (out_dir / "checkpoints").exists()


def test_fsdp_shards_over_two_processes_and_saves_a_whole_model(gsm8k_train, tmp_path: Path):
    train_path, ids = write_train_table(gsm8k_train[:16], tmp_path / "train.parquet")
    config = FinetuneConfig(epochs=1, batch_size=4, checkpoint_steps=1, num_processes=2, fsdp=True)
    ref = finetune(train_path, ids, MODEL, config, tmp_path / "fsdp", "cpu", "fp32")
    assert ref.steps == 2 and ref.processes == 2
    tuned = AutoModelForCausalLM.from_pretrained(ref.model_dir, use_safetensors=True).state_dict()
    base = AutoModelForCausalLM.from_pretrained(MODEL.name, use_safetensors=True).state_dict()
    assert set(tuned) == set(base)  # gathered from the shards, no FSDP prefixes
    assert all(tuned[k].shape == v.shape for k, v in base.items())
    assert any(bool((tuned[k] != v).any()) for k, v in base.items())


def test_a_diverging_worker_raises_non_finite_loss_in_the_parent(gsm8k_train, tmp_path: Path):
    """The parent learns of the divergence from the workers' result file, not their log."""
    train_path, ids = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    # 6 steps: the loss is still finite at step 2 (grad norm NaN), NaN a few steps later.
    config = DIVERGING.model_copy(update={"epochs": 2, "num_processes": 2})
    out_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="finetune.learning_rate"):
        finetune(train_path, ids, MODEL, config, out_dir, "cpu", "fp32")
    assert (out_dir / "launch" / "result.json").is_file()
    assert not (out_dir / "model.safetensors").exists()
