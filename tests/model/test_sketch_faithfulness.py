"""The default sketch on a model wider than it: a seeded random-init llama of width 768 (the
bundled stories260K model, d=64, is never sketched). benchmarks/bench_sketch.py measures the
same at N=1,000."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from steps.modeling import ModelConfig
from steps.selection.embedding.embed import EmbedConfig, embed_pool, load_pool
from steps.selection.pool import FeaturePool, project
from steps.selection.selectors import fisher_objective, select
from tests.conftest import MODEL_DIR
from tests.model.conftest import write_train_table

pytestmark = pytest.mark.slow
WIDTH = 768


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> ModelConfig:
    """One thin layer of width 768 over stories260K's tokenizer: the pass takes seconds."""
    model_dir = tmp_path_factory.mktemp("llama-768")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    settings = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=12,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(settings).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return ModelConfig(name=str(model_dir))


def grams(pool: FeaturePool) -> list[np.ndarray]:
    blocks = (pool.factors[a:b].astype(np.float64) for a, b in itertools.pairwise(pool.offsets))
    return [block.T @ block for block in blocks]


def test_default_sketch_is_the_projection_and_keeps_the_exact_gain(
    wide_model: ModelConfig, gsm8k_train, tmp_path: Path, one_torch_thread
):
    table, _ = write_train_table(gsm8k_train[:24], tmp_path / "pool.parquet")
    default = EmbedConfig()
    assert 0 < default.sketch_dim < WIDTH  # else this model is not sketched by default
    sketched = load_pool(embed_pool(table, wide_model, default, tmp_path / "s", "cpu", "fp32"))
    exact_config = EmbedConfig(sketch_dim=0)
    exact = load_pool(embed_pool(table, wide_model, exact_config, tmp_path / "e", "cpu", "fp32"))
    assert (sketched.d, exact.d) == (default.sketch_dim, WIDTH)
    projected = project(exact, default.sketch_dim, default.sketch_seed)
    for i, (got, want) in enumerate(zip(grams(sketched), grams(projected), strict=True)):
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < 1e-4, f"example {i}: its sketch is {error:.1e} off the projection"
    empty = fisher_objective(exact, [])
    best = fisher_objective(exact, select(exact, 8, "fisher").order) - empty
    reached = fisher_objective(exact, select(sketched, 8, "fisher").order) - empty
    assert reached >= 0.995 * best, reached / best  # the bar benchmarks/bench_sketch.py sets
