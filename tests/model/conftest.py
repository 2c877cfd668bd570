"""Fixtures of the fine-tuning tests."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from steps.training.job import FinetuneConfig


@pytest.fixture
def one_torch_thread():
    """The model is tiny: a second intra-op thread only spin-waits on a busy 2-core CI machine
    (the kill test took 180 s with 2 threads under load, 16 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_train_table(rows: list[dict], path: Path) -> tuple[str, list[str]]:
    """GSM8K records in the validated-table schema (id, prompt, response), as Parquet."""
    frame = pd.DataFrame(
        {
            "id": [f"gsm8k-{i}" for i in range(len(rows))],
            "prompt": [r["question"] for r in rows],
            "response": [r["answer"] for r in rows],
        }
    )
    frame.to_parquet(path)
    return str(path), list(frame.id)


# An absurd learning rate, unclipped: the loss is inf or NaN within the first steps.
DIVERGING = FinetuneConfig(
    epochs=1,
    batch_size=4,
    learning_rate=1e30,
    max_grad_norm=1e6,
    logging_steps=1,
    checkpoint_steps=0,
)
