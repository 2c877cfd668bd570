"""Model tests on the real stories260K checkpoint."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from steps.data.ingest import IngestConfig, ingest
from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.modeling import (
    ModelConfig,
    encode_examples,
    load_model,
    load_tokenizer,
    model_source,
    pad_batch,
    trained_source,
)
from steps.selection.embedding.embed import EmbedConfig, embed_pool, load_pool
from steps.training.finetune import FinetuneConfig, finetune
from tests.conftest import MODEL_DIR, new_run_id

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
        tables.train.path, MODEL, EmbedConfig(batch_tokens=1024), tmp_path / "f", "cpu", "fp32"
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


# Recorded with torch 2.13.0 / transformers 5.23.0 on CPU, fp32 (seed 0, batch 4, 2 epochs of
# the 24 ingested GSM8K examples): the first 4 per-step training losses, and the held-out
# loss before and after. They pin ingest -> finetune -> evaluate end to end: a change to
# tokenisation, batching, the optimiser or the loss masking moves them.
GOLDEN_FIRST_LOSSES = [6.8439, 6.3144, 4.9738, 4.5762]
GOLDEN_BASE_EVAL_LOSS = 6.9886
GOLDEN_TUNED_EVAL_LOSS = 3.5946


def test_finetuning_reproduces_golden_first_losses_and_lowers_held_out_loss(tables, tmp_path: Path):
    ids = list(pd.read_parquet(tables.train.path).id)
    config = FinetuneConfig(epochs=2, batch_size=4, logging_steps=1, seed=0)
    run_id = new_run_id("embed-finetune-evaluate-tests")
    base = evaluate(model_source(MODEL), tables.eval.path, EvalConfig(), "cpu", "fp32")
    tuned_ref = finetune(
        tables.train.path, ids, MODEL, config, tmp_path / "m", "cpu", "fp32", run_id
    )
    tuned_source = trained_source(MODEL, tuned_ref.model_dir)
    tuned = evaluate(tuned_source, tables.eval.path, EvalConfig(), "cpu", "fp32")
    losses = [m.value for m in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert tuned_ref.steps == 12 and len(losses) == 12
    assert losses[:4] == pytest.approx(GOLDEN_FIRST_LOSSES, abs=0.02)
    assert (Path(tuned_ref.model_dir) / "model.safetensors").is_file()
    assert base.loss == pytest.approx(GOLDEN_BASE_EVAL_LOSS, abs=1e-3)  # no training involved
    assert tuned.loss == pytest.approx(GOLDEN_TUNED_EVAL_LOSS, abs=0.02)
    assert tuned.loss < base.loss - 1.0
    assert tuned.tokens == base.tokens > 0
