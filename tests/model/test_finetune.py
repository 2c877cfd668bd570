"""Fine-tuning on the real stories260K model: golden losses, resume after kill, LoRA, NaN stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.modeling import ModelConfig, ModelSource, trained_source
from steps.training.finetune import FinetuneConfig, NonFiniteLossError, finetune
from steps.training.job import NON_FINITE_LOSS_EXIT, TrainJob, WorkerFailure, read_result
from tests.conftest import MODEL_DIR, REPO, new_run_id
from tests.kill_training import kill_at_first_checkpoint
from tests.model.conftest import DIVERGING, write_train_table

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


def _job(path: str, ids: list[str], config: FinetuneConfig, out_dir: Path) -> TrainJob:
    return TrainJob(
        train_path=path,
        selected_ids=ids,
        model=MODEL,
        finetune=config,
        out_dir=out_dir,
        device="cpu",
        precision="fp32",
    )


def _worker(spec_path: Path, *result_path: Path, **popen) -> subprocess.Popen:
    """One real worker process, as accelerate launch starts each of its N."""
    return subprocess.Popen(
        [sys.executable, "-m", "steps.training.launch", str(spec_path), *map(str, result_path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **popen,
    )


def test_a_killed_run_resumes_from_its_last_checkpoint(train_table, tmp_path: Path):
    """SIGKILL a real training process after its first checkpoint; the re-run resumes and
    ends where an uninterrupted run ends (same steps, same loss within tolerance)."""
    path, ids = train_table
    # 6 steps per epoch, checkpoint at step 8: the kill lands mid-epoch, so the resume must
    # skip the trained batches of epoch 2 and then replay epoch 3 in the same order.
    config = FinetuneConfig(epochs=3, batch_size=4, logging_steps=1, checkpoint_steps=8)
    out_dir = tmp_path / "killed"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(_job(path, ids, config, out_dir).model_dump_json())
    worker = _worker(spec_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = kill_at_first_checkpoint(worker, out_dir / "checkpoints")
    assert not (out_dir / "model.safetensors").exists()
    killed_at = int(killed.name.split("-")[1])
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
    tuned_loss = evaluate(
        trained_source(MODEL, ref.model_dir), path, EvalConfig(), "cpu", "fp32"
    ).loss
    assert tuned_loss < evaluate(ModelSource(MODEL, "base"), path, EvalConfig(), "cpu", "fp32").loss


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(train_table, tmp_path):
    path, ids = train_table
    with pytest.raises(NonFiniteLossError, match="finetune.learning_rate"):
        finetune(path, ids, MODEL, DIVERGING, tmp_path / "nan", "cpu", "fp32")
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_a_diverging_worker_exits_with_its_own_code_and_writes_the_failure(train_table, tmp_path):
    """What the parent of a multi-process run reads instead of the log: the exit status and
    the result file of the worker (here run directly, as accelerate launch runs it)."""
    path, ids = train_table
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(_job(path, ids, DIVERGING, tmp_path / "nan").model_dump_json())
    worker = _worker(spec_path, result_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = worker.communicate(timeout=300)
    assert worker.returncode == NON_FINITE_LOSS_EXIT, stderr.decode()[-2000:]
    failure = read_result(result_path)
    assert isinstance(failure, WorkerFailure) and failure.error == "non_finite_loss"
    assert "finetune.learning_rate" in failure.message
    assert not (tmp_path / "nan" / "model.safetensors").exists()
