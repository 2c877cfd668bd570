"""finetune.steps: one pass in exactly that many optimiser steps of near-equal batches; its
config errors; the length-grouped sampler it shares a helper with, unchanged; and (slow) a real
fine-tune of stories260K that takes exactly S steps and sees every example once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate import skip_first_batches
from pydantic import ValidationError
from torch.utils.data import DataLoader

from steps.modeling import ModelConfig, encode_examples, load_tokenizer
from steps.training.batching import MEGABATCH_BATCHES, EpochSampler, StepsBatchSampler
from steps.training.finetune import FinetuneConfig, finetune
from steps.training.job import TrainJob
from tests.conftest import MODEL_DIR, REPO
from tests.kill_training import kill_at_first_checkpoint


def _lengths(n: int, seed: int = 0) -> list[int]:
    return torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("n", "steps"), [(13, 4), (100, 13), (7, 7), (5, 1), (1000, 9)])
@pytest.mark.parametrize("group", [True, False])
def test_n_examples_in_s_batches_of_near_equal_size_each_seen_once(n, steps, group):
    sampler = StepsBatchSampler(_lengths(n), steps, seed=3, group_by_length=group)
    batches = list(sampler)
    sizes = [len(b) for b in batches]
    assert len(batches) == len(sampler) == steps
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert sorted(i for b in batches for i in b) == list(range(n))


def test_the_order_is_a_function_of_seed_and_epoch_only():
    lengths = _lengths(60)
    first, again = (list(StepsBatchSampler(lengths, 8, 1, True)) for _ in range(2))
    assert first == again
    assert list(StepsBatchSampler(lengths, 8, 2, True)) != first
    later = StepsBatchSampler(lengths, 8, 1, True)
    later.set_epoch(1)
    assert list(later) != first


def test_length_grouped_batches_hold_similar_lengths():
    lengths = _lengths(400)
    grouped = list(StepsBatchSampler(lengths, 40, 0, group_by_length=True))
    mixed = list(StepsBatchSampler(lengths, 40, 0, group_by_length=False))

    def padding(batches: list[list[int]]) -> int:
        return sum(
            len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches
        )

    assert padding(grouped) < padding(mixed) / 5


def test_a_resume_skips_exactly_the_trained_batches():
    """What Trainer does on a resume (accelerate's skip_first_batches): the rest, in order."""
    sampler = StepsBatchSampler(_lengths(30), 7, 5, True)
    loader = DataLoader(list(range(30)), batch_sampler=sampler, collate_fn=list)
    assert list(skip_first_batches(loader, 3)) == list(loader)[3:]


def test_more_steps_than_examples_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="finetune.steps"):
        StepsBatchSampler(_lengths(3), 4, 0, True)
    job = {"train_path": "t.parquet", "selected_ids": ["a", "b", "c"],
           "model": ModelConfig(name=str(MODEL_DIR)), "out_dir": Path("m"), "device": "cpu",
           "precision": "fp32"}  # fmt: skip
    with pytest.raises(ValidationError, match=r"finetune.steps=4 needs .* 3 examples"):
        TrainJob(**job, finetune=FinetuneConfig(epochs=1, steps=4))
    accumulated = FinetuneConfig(epochs=1, steps=2, gradient_accumulation_steps=2)
    with pytest.raises(ValidationError, match=r"finetune.steps=2 x 2 micro-batches"):
        TrainJob(**job, finetune=accumulated)
    assert TrainJob(**job, finetune=FinetuneConfig(epochs=1, steps=3)).finetune.steps == 3


def test_steps_need_one_epoch_and_one_process_naming_both_keys():
    with pytest.raises(ValidationError, match=r"finetune.steps=5.*finetune.epochs=1 \(got 3\)"):
        FinetuneConfig(steps=5)
    with pytest.raises(ValidationError, match=r"finetune.steps=5.*finetune.num_processes=1"):
        FinetuneConfig(epochs=1, steps=5, num_processes=2)
    with pytest.raises(ValidationError, match="steps"):
        FinetuneConfig(epochs=1, steps=0)
    assert FinetuneConfig().steps is None  # unset: batches of batch_size, as before


def _epoch_sampler_before(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """EpochSampler's order as it was written before StepsBatchSampler shared its helper."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * MEGABATCH_BATCHES
    grouped: list[int] = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: -lengths[i])
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + tail for i in batch]


@pytest.mark.parametrize(("n", "batch_size"), [(24, 4), (1000, 8), (803, 3), (1, 16), (0, 4)])
def test_the_length_grouped_sampler_is_unchanged(n, batch_size):
    lengths = _lengths(n, seed=n)
    sampler = EpochSampler(lengths, batch_size, seed=2, group_by_length=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert list(sampler) == _epoch_sampler_before(lengths, batch_size, 2, epoch)


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table(rows: list[dict], path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "id": [f"gsm8k-{i}" for i in range(len(rows))],
            "prompt": [r["question"] for r in rows],
            "response": [r["answer"] for r in rows],
        }
    )
    frame.to_parquet(path)
    return frame


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_fine_tune_takes_exactly_s_steps_over_every_example_once(gsm8k_train, tmp_path):
    frame = _table(gsm8k_train[:13], tmp_path / "train.parquet")
    model = ModelConfig(name=str(MODEL_DIR))
    config = FinetuneConfig(epochs=1, steps=4, batch_size=8, logging_steps=1, checkpoint_steps=0)
    ref = finetune(
        tmp_path / "train.parquet", list(frame.id), model, config, tmp_path / "m", "cpu", "fp32"
    )
    encoded = encode_examples(load_tokenizer(model), list(frame.prompt), list(frame.response),
                              model)  # fmt: skip
    assert ref.steps == 4  # batch_size 8 alone would take 2
    assert ref.tokens == sum(len(e.input_ids) for e in encoded)  # each example once, unpadded
    too_many = config.model_copy(update={"steps": 14})
    with pytest.raises(ValidationError, match="finetune.steps=14"):
        finetune(tmp_path / "train.parquet", list(frame.id), model, too_many, tmp_path / "n",
                 "cpu", "fp32")  # fmt: skip
    assert not (tmp_path / "n").exists()  # refused before training


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_killed_equal_steps_run_resumes_where_it_stopped(gsm8k_train, tmp_path):
    """SIGKILL a real worker after a checkpoint; the re-run skips the trained batches of the
    batch sampler and ends where an uninterrupted run ends."""
    path = str(tmp_path / "train.parquet")
    ids = list(_table(gsm8k_train[:24], Path(path)).id)
    config = FinetuneConfig(epochs=1, steps=12, logging_steps=1, checkpoint_steps=3)
    model, out_dir = ModelConfig(name=str(MODEL_DIR)), tmp_path / "killed"
    job = TrainJob(train_path=path, selected_ids=ids, model=model, finetune=config,
                   out_dir=out_dir, device="cpu", precision="fp32")  # fmt: skip
    (tmp_path / "spec.json").write_text(job.model_dump_json())
    worker = subprocess.Popen(
        [sys.executable, "-m", "steps.training.launch", str(tmp_path / "spec.json")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    killed = kill_at_first_checkpoint(worker, out_dir / "checkpoints")
    killed_at = int(killed.name.split("-")[1])

    resumed = finetune(path, ids, model, config, out_dir, "cpu", "fp32")
    straight = finetune(path, ids, model, config, tmp_path / "straight", "cpu", "fp32")
    assert resumed.resumed_from_step == killed_at in (3, 6, 9)
    assert resumed.steps == straight.steps == 12
    assert resumed.final_loss == pytest.approx(straight.final_loss, abs=1e-3)
    assert resumed.train_loss == pytest.approx(straight.train_loss, abs=1e-3)
