"""Damaged cache files on disk are found by what proves them whole and rebuilt, with a warning
naming them, never reused: embedding chunks, a trained model's weights, training checkpoints.
(The flow side, cached Prefect results, is tests/flows/test_cache_healing.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steps.hashing import file_md5
from steps.integrity import CorruptArtifactError
from steps.modeling import ModelConfig
from steps.registry.register import RegisterConfig, register_model
from steps.selection.embedding.embed import FILES, EmbedConfig, FeaturesRef, embed_pool
from steps.training.finetune import FinetuneConfig, ModelRef, finetune, model_problem
from steps.training.job import TrainJob
from tests.conftest import MODEL_DIR, REPO
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
# 16 examples in 2 chunks: one damaged chunk is recomputed, the other reused.
EMBED = EmbedConfig(batch_tokens=1024, chunk_examples=8)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_table(tmp_path_factory, gsm8k_train) -> str:
    path, _ = write_train_table(gsm8k_train[:16], tmp_path_factory.mktemp("pool") / "pool.parquet")
    return path


@pytest.fixture(scope="module")
def embedded(pool_table: str, tmp_path_factory) -> FeaturesRef:
    return embed_pool(pool_table, MODEL, EMBED, tmp_path_factory.mktemp("one") / "f", "cpu", "fp32")


def _files(features_dir: Path) -> dict[str, bytes]:
    return {name: (features_dir / f"{name}.npy").read_bytes() for name in FILES}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "swapped"])
def test_a_damaged_chunk_is_computed_again_with_a_warning_and_the_same_bytes(
    damage: str, pool_table: str, embedded: FeaturesRef, tmp_path: Path, caplog
):
    out_dir = tmp_path / "features"
    shutil.copytree(embedded.features_dir, out_dir)
    first, second = out_dir / "chunk-00000.npz", out_dir / "chunk-00001.npz"
    if damage == "truncated":  # what a full disk or a killed copy leaves: BadZipFile before
        _truncate(second)
    else:  # a whole, readable chunk of other rows: merged silently before
        shutil.copy(first, second)
    kept = first.stat().st_mtime_ns

    with caplog.at_level(logging.WARNING):
        again = embed_pool(pool_table, MODEL, EMBED, out_dir, "cpu", "fp32")

    notices = [r.getMessage() for r in caplog.records if str(second) in r.getMessage()]
    assert len(notices) == 1 and "computing that chunk again" in notices[0], caplog.text
    assert "\n" not in notices[0]
    assert first.stat().st_mtime_ns == kept  # the intact chunk is reused
    assert _files(out_dir) == _files(Path(embedded.features_dir))  # the same statistics
    assert again.examples == embedded.examples and again.loss_tokens == embedded.loss_tokens
    assert file_md5(second) == (out_dir / "chunk-00001.md5").read_text()


def _model_folder(path: Path) -> ModelRef:
    """A copy of the bundled model as a fine-tune's folder, with the ModelRef training returns."""
    shutil.copytree(MODEL_DIR, path)
    weights = file_md5(path / "model.safetensors")
    return ModelRef(str(path), 1.0, 1.0, 1, 1, 1.0, 0.0, 0, 1, None, weights_md5=weights)


def test_model_problem_names_unreadable_and_foreign_weights(tmp_path: Path):
    ref = _model_folder(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    assert model_problem(ref) is None

    weights.write_bytes(os.urandom(4096))  # the hostile tester's garbage
    problem = model_problem(ref)
    assert problem is not None and str(weights) in problem and "header too large" in problem

    save_file({"w": torch.zeros(3)}, str(weights))  # readable, but not what training saved
    problem = model_problem(ref)
    assert problem is not None and str(weights) in problem
    assert f"not the {ref.weights_md5} recorded" in problem

    weights.unlink()
    assert model_problem(ref) == f"{weights} is missing"


def test_register_refuses_unreadable_weights_in_one_line_before_logging_anything(tmp_path: Path):
    ref = _model_folder(tmp_path / "model")
    weights = Path(ref.model_dir) / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    config = RegisterConfig(model_name="sift-unreadable")
    with pytest.raises(CorruptArtifactError, match="header too large") as raised:
        register_model(ref.model_dir, "no-run-is-touched", config, {})
    assert str(raised.value) == f"register: {model_problem(ref)}"


def test_finetune_records_the_md5_of_the_weights_it_saved(gsm8k_train, tmp_path: Path):
    path, ids = write_train_table(gsm8k_train[:8], tmp_path / "train.parquet")
    config = FinetuneConfig(epochs=1, batch_size=4, checkpoint_steps=0)
    ref = finetune(path, ids, MODEL, config, tmp_path / "m", "cpu", "fp32")
    assert ref.weights_md5 == file_md5(tmp_path / "m" / "model.safetensors")
    assert model_problem(ref) is None


def _complete(checkpoints: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (written last) reads, newest first."""
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(path)
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _kill_at_second_checkpoint(spec_path: Path, checkpoints: Path) -> list[Path]:
    """A real training process, SIGKILLed once two complete checkpoints are on disk."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "steps.training.launch", str(spec_path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(_complete(checkpoints)) < 2 and worker.poll() is None:
        assert time.monotonic() < deadline, "no two checkpoints within 120 s"
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    return _complete(checkpoints)


def test_a_damaged_newest_checkpoint_is_discarded_and_training_resumes_from_the_one_before(
    gsm8k_train, tmp_path: Path, caplog, one_torch_thread
):
    path, ids = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    # 6 steps an epoch, a checkpoint every 2, two kept: the kill leaves two complete ones
    config = FinetuneConfig(epochs=2, batch_size=4, logging_steps=1, checkpoint_steps=2)
    out_dir = tmp_path / "killed"
    spec = TrainJob(train_path=path, selected_ids=ids, model=MODEL, finetune=config,
                    out_dir=out_dir, device="cpu", precision="fp32")  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    newest, previous = _kill_at_second_checkpoint(spec_path, out_dir / "checkpoints")[:2]
    (newest / "model.safetensors").write_bytes(os.urandom(4096))
    _truncate(newest / "optimizer.pt")

    with caplog.at_level(logging.WARNING):
        resumed = finetune(path, ids, MODEL, config, out_dir, "cpu", "fp32")

    notices = [r.getMessage() for r in caplog.records if "discarding checkpoint" in r.getMessage()]
    assert len(notices) == 1 and str(newest) in notices[0], caplog.text
    assert resumed.resumed_from_step == int(previous.name.split("-")[1])
    assert resumed.steps == 12 and np.isfinite(resumed.train_loss)
    assert model_problem(resumed) is None
