"""The embedding pass's statistics on disk: chunks, resume, sketches (real stories260K)."""

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steps.data.ingest import IngestConfig, ingest, write_table
from steps.modeling import ModelConfig
from steps.selection.embedding.embed import FILES, EmbedConfig, embed_pool, load_pool
from steps.selection.pool import project
from steps.selection.selectors import fisher_objective, select
from tests.conftest import MODEL_DIR

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_table(tmp_path_factory, gsm8k_train, gsm8k_test) -> str:
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("pool")
    config = IngestConfig(
        source=str(write_jsonl(root / "raw" / "train.jsonl", gsm8k_train)),
        eval_source=str(write_jsonl(root / "raw" / "test.jsonl", gsm8k_test)),
    )
    return ingest(config, root, root / "staging").train.path


@pytest.fixture(scope="module")
def exact(pool_table: str, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact")
    return embed_pool(pool_table, MODEL, EmbedConfig(batch_tokens=2048), out, "cpu", "fp32")


def arrays(features_dir: str) -> dict[str, np.ndarray]:
    return {name: np.load(Path(features_dir) / f"{name}.npy") for name in FILES}


def grams(features_dir: str) -> list[np.ndarray]:
    """Each example's FᵀF in float64: the statistic FisherSFT reads from a factor."""
    factors, offsets = (np.load(Path(features_dir) / f"{n}.npy") for n in ("factors", "offsets"))
    blocks = (factors[a:b].astype(np.float64) for a, b in itertools.pairwise(offsets))
    return [block.T @ block for block in blocks]


def test_chunked_pass_equals_one_chunk_and_resumes_after_a_lost_chunk(
    pool_table: str, exact, tmp_path: Path
):
    config = EmbedConfig(batch_tokens=2048, chunk_examples=16)
    chunked = embed_pool(pool_table, MODEL, config, tmp_path / "c", "cpu", "fp32")
    assert len(list((tmp_path / "c").glob("chunk-*.npz"))) == 5  # 80 examples / 16
    assert chunked.examples == exact.examples == 80 and chunked.dim == exact.dim == 64
    for name, array in arrays(exact.features_dir).items():
        if name != "factors":
            np.testing.assert_allclose(
                arrays(chunked.features_dir)[name], array, rtol=1e-4, atol=1e-4
            )
    # A factor stands for its Gram FᵀF and is unique only up to a rotation: for an example
    # of more than d tokens it is an eigen-factor, and nearly equal eigenvalues turn their
    # vectors under the fp32 noise of other batch shapes (measured: factors 5.6e-4 apart,
    # their Grams 2e-7 relative). So the pass is compared on the Grams.
    for got, want in zip(grams(chunked.features_dir), grams(exact.features_dir), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    before = arrays(chunked.features_dir)
    (tmp_path / "c" / "chunk-00002.npz").unlink()  # as if killed while writing chunk 2
    resumed = embed_pool(pool_table, MODEL, config, tmp_path / "c", "cpu", "fp32")
    assert resumed.loss_tokens == chunked.loss_tokens
    for name, array in arrays(resumed.features_dir).items():
        np.testing.assert_array_equal(array, before[name])


def test_chunks_from_other_settings_are_not_reused(pool_table: str, tmp_path: Path):
    embed_pool(pool_table, MODEL, EmbedConfig(chunk_examples=40), tmp_path / "f", "cpu", "fp32")
    sketched = embed_pool(
        pool_table,
        MODEL,
        EmbedConfig(chunk_examples=40, sketch_dim=16),
        tmp_path / "f",
        "cpu",
        "fp32",
    )
    assert sketched.dim == 16 and sketched.hidden_size == 64
    assert load_pool(sketched).factors.shape[1] == 16


def test_sketch_is_the_projection_of_the_exact_statistics(pool_table: str, exact, tmp_path):
    config = EmbedConfig(sketch_dim=32, sketch_seed=3)
    sketched = load_pool(embed_pool(pool_table, MODEL, config, tmp_path / "s", "cpu", "fp32"))
    reference = project(load_pool(exact), 32, seed=3)
    for i in (0, 17, 79):
        got = sketched.factors[sketched.offsets[i] : sketched.offsets[i + 1]].astype(np.float64)
        want = reference.factors[reference.offsets[i] : reference.offsets[i + 1]]
        want = want.astype(np.float64)
        np.testing.assert_allclose(got.T @ got, want.T @ want, rtol=1e-3, atol=1e-2)


def test_sketches_keep_most_of_the_exact_information_gain(pool_table: str, exact, tmp_path):
    """The documented approximation error: picks made on a sketch, scored on the exact f."""
    pool = load_pool(exact)
    empty = fisher_objective(pool, [])

    def info_gain(order) -> float:
        return fisher_objective(pool, order) - empty

    best = info_gain(select(pool, 8, "fisher").order)
    quality = {}
    for name, config in {
        "projected to 32": EmbedConfig(sketch_dim=32),
        "rank 8": EmbedConfig(max_rank=8),
        "projected to 32, rank 8": EmbedConfig(sketch_dim=32, max_rank=8),
    }.items():
        sketch = load_pool(embed_pool(pool_table, MODEL, config, tmp_path / name, "cpu", "fp32"))
        assert sketch.ranks.max() <= (8 if "rank" in name else 32)
        quality[name] = info_gain(select(sketch, 8, "fisher").order) / best
    uniform = info_gain(select(pool, 8, "uniform", seed=0).order) / best
    print(f"exact-objective quality of sketched picks: {quality}; uniform {uniform:.3f}")
    assert all(q > 0.9 for q in quality.values()), quality
    assert min(quality.values()) > uniform


def test_examples_without_response_tokens_are_named(tmp_path: Path, pool_table: str):
    frame = pd.read_parquet(pool_table).head(4).copy()
    frame.loc[2, "prompt"] = "word " * 2000  # fills model.max_length: no response left
    write_table(frame, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no loss-bearing response tokens, e.g. row 2 \(id"):
        embed_pool(str(tmp_path / "t.parquet"), MODEL, EmbedConfig(), tmp_path / "f", "cpu", "fp32")
