"""Model tests on the real stories260K checkpoint."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steps.data.ingest import IngestConfig, ingest
from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.modeling import ModelConfig, encode_examples, load_model, load_tokenizer, pad_batch
from steps.selection.embed import EmbedConfig, embed_pool, load_pool
from steps.training.finetune import FinetuneConfig, finetune
from tests.conftest import MODEL_DIR

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = pytest.mark.slow


@pytest.fixture
def tables(project: Path, tmp_path: Path):
    config = IngestConfig(
        source=str(project / "raw" / "train.jsonl"),
        eval_source=str(project / "raw" / "test.jsonl"),
        limit=24,
    )
    return ingest(config, project, tmp_path / "staging")


def test_factors_reproduce_the_gram_of_loss_token_states(tables, tmp_path: Path):
    ref = embed_pool(
        tables.train.path, MODEL, EmbedConfig(batch_tokens=1024), tmp_path / "f", "cpu"
    )
    pool = load_pool(ref)
    frame = pd.read_parquet(tables.train.path)
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, "cpu").eval()
    encoded = encode_examples(tokenizer, list(frame.prompt), list(frame.response), MODEL)
    assert ref.examples == 24 and ref.dim == 64
    assert list(pool.n_tokens) == [e.n_loss_tokens for e in encoded]
    for i in (0, 7):  # one example at a time, no padding: the reference states
        batch = pad_batch([encoded[i]], tokenizer.pad_token_id)
        with torch.inference_mode():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1][0, :-1]
        x = hidden[batch["labels"][0, 1:] != -100].double().numpy()
        factor = pool.factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
        np.testing.assert_allclose(factor.T @ factor, x.T @ x, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(pool.pooled[i], x.mean(axis=0), rtol=1e-4, atol=1e-4)
    assert np.isfinite(pool.base_loss).all() and (pool.base_loss > 3).all()  # untrained domain


def test_finetuning_lowers_held_out_loss_with_golden_first_losses(tables, tmp_path: Path):
    ids = list(pd.read_parquet(tables.train.path).id)
    config = FinetuneConfig(epochs=2, batch_size=4, logging_steps=1, seed=0)
    base = evaluate(MODEL.name, tables.eval.path, MODEL, EvalConfig(), "cpu")
    tuned_ref = finetune(tables.train.path, ids, MODEL, config, tmp_path / "m", "cpu", "fp32")
    tuned = evaluate(tuned_ref.model_dir, tables.eval.path, MODEL, EvalConfig(), "cpu")
    assert tuned_ref.steps == 12
    assert (Path(tuned_ref.model_dir) / "model.safetensors").is_file()
    assert base.loss == pytest.approx(7.0, abs=0.3)  # stories260K on GSM8K (data/README)
    assert tuned.loss < base.loss - 1.0
    assert tuned.tokens == base.tokens > 0
