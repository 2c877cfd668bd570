"""Fine-tuning on the real stories260K model: golden losses, resume after kill, LoRA, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.modeling import ModelConfig
from steps.training.finetune import FinetuneConfig, NonFiniteLossError, finetune, last_checkpoint
from tests.conftest import MODEL_DIR, REPO, new_run_id
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def train_table(gsm8k_train, tmp_path: Path) -> tuple[str, list[str]]:
    """24 GSM8K examples in the validated-table schema (id, prompt, response)."""
    return write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")


def _run_id() -> str:
    return new_run_id("finetune-tests")


# Recorded with torch 2.13.0 / transformers 5.23.0 on CPU, fp32: per-step training loss of
# the first 6 steps (batch 4, lr 2e-3 cosine, seed 0, length-grouped batches).
GOLDEN_LOSSES = [6.8439, 6.3144, 4.9783, 4.6791, 4.1723, 4.0094]


def test_golden_losses_and_step_metrics_in_mlflow(train_table, tmp_path: Path):
    path, ids = train_table
    run_id = _run_id()
    config = FinetuneConfig(epochs=1, batch_size=4, logging_steps=1, checkpoint_steps=0)
    ref = finetune(path, ids, MODEL, config, tmp_path / "m", "cpu", "fp32", run_id)
    client = MlflowClient()
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert ref.steps == 6 and ref.resumed_from_step == 0
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=0.02)
    for name in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        history = client.get_metric_history(run_id, name)
        assert len(history) == 6 and all(m.value > 0 for m in history), name
    assert ref.tokens > 0 and 0 <= ref.padding_fraction <= 0.10  # length-grouped batches
    saved = sorted(p.name for p in Path(ref.model_dir).iterdir())
    assert "model.safetensors" in saved and "tokenizer.json" in saved
    assert not [n for n in saved if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickles


def _spec(path: str, ids: list[str], config: FinetuneConfig, out_dir: Path) -> dict:
    return {
        "train_path": path,
        "selected_ids": ids,
        "model_config": MODEL.model_dump(),
        "config": config.model_dump(),
        "out_dir": str(out_dir),
        "device": "cpu",
        "precision": "fp32",
        "run_id": None,
    }


def test_a_killed_run_resumes_from_its_last_checkpoint(train_table, tmp_path: Path):
    """SIGKILL a real training process after its first checkpoint; the re-run resumes and
    ends where an uninterrupted run ends (same steps, same loss within tolerance)."""
    path, ids = train_table
    # 6 steps per epoch, checkpoint at step 8: the kill lands mid-epoch, so the resume must
    # skip the trained batches of epoch 2 and then replay epoch 3 in the same order.
    config = FinetuneConfig(epochs=3, batch_size=4, logging_steps=1, checkpoint_steps=8)
    out_dir = tmp_path / "killed"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(path, ids, config, out_dir)))
    worker = subprocess.Popen(
        [sys.executable, "-m", "steps.training.launch", str(spec_path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while last_checkpoint(out_dir / "checkpoints") is None and worker.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out_dir / "model.safetensors").exists()
    killed_at = int(last_checkpoint(out_dir / "checkpoints").name.split("-")[1])  # type: ignore[union-attr]
    assert killed_at in (8, 16)

    resumed = finetune(path, ids, MODEL, config, out_dir, "cpu", "fp32")
    straight = finetune(path, ids, MODEL, config, tmp_path / "straight", "cpu", "fp32")
    assert resumed.resumed_from_step == killed_at and straight.resumed_from_step == 0
    assert resumed.steps == straight.steps == 18
    assert resumed.final_loss == pytest.approx(straight.final_loss, abs=1e-3)
    assert resumed.train_loss == pytest.approx(straight.train_loss, abs=1e-3)
    assert not (out_dir / "checkpoints").exists()  # removed once the model is saved


def test_lora_saves_a_merged_model_that_evaluates_like_a_full_one(train_table, tmp_path: Path):
    path, ids = train_table
    config = FinetuneConfig(
        method="lora", epochs=2, batch_size=4, learning_rate=1e-2, lora_r=8, checkpoint_steps=4
    )
    ref = finetune(path, ids, MODEL, config, tmp_path / "lora", "cpu", "fp32")
    saved = {p.name for p in Path(ref.model_dir).iterdir()}
    assert "model.safetensors" in saved and "adapter_config.json" not in saved
    merged = AutoModelForCausalLM.from_pretrained(ref.model_dir, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(MODEL.name, use_safetensors=True)
    assert set(merged.state_dict()) == set(base.state_dict())  # no lora_A/lora_B left
    tuned = merged.state_dict()
    assert any(bool((tuned[k] != v).any()) for k, v in base.state_dict().items())
    report = evaluate(ref.model_dir, path, MODEL, EvalConfig(), "cpu")
    assert report.loss < evaluate(MODEL.name, path, MODEL, EvalConfig(), "cpu").loss


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(train_table, tmp_path):
    path, ids = train_table
    config = FinetuneConfig(
        epochs=1,
        batch_size=4,
        learning_rate=1e30,
        max_grad_norm=1e6,
        logging_steps=1,
        checkpoint_steps=0,
    )
    with pytest.raises(NonFiniteLossError, match="finetune.learning_rate"):
        finetune(path, ids, MODEL, config, tmp_path / "nan", "cpu", "fp32")
    assert not (tmp_path / "nan" / "model.safetensors").exists()
