"""The torch backend and the float32 screen against the numpy design and plain greedy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.config import load_config
from steps.selection.greedy.design import Design
from steps.selection.greedy.search import lazy_greedy
from steps.selection.greedy.settings import GreedySettings
from steps.selection.greedy.torch_design import MAX_PADDING, TorchDesign
from steps.selection.pool import FeaturePool, pool_from_tokens
from steps.selection.select import SelectConfig, load_prior, resolve_backend, select_subset
from steps.selection.selectors import plain_greedy_fisher, select
from tests.conftest import write_pool_features

# Every example by the low-rank route and screened, so the float32 tier decides what is
# evaluated in float64 even at the small d of these tests.
SCREENED = GreedySettings(screen_min_d=1, gram_min_rank=2.0)


def token_states(n: int, d: int, seed: int, t_max: int = 30) -> list[np.ndarray]:
    """(T, d) states: an example mean plus token noise under a power-law spectrum."""
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(d)) ** -0.75
    lengths = rng.integers(1, t_max + 1, size=n)
    return [(rng.standard_normal(d) + rng.standard_normal((t, d))) * scale for t in lengths]


def pool_with_duplicates(n: int, d: int, seed: int) -> FeaturePool:
    states = token_states(n, d, seed)
    return pool_from_tokens([*states, states[5], states[5], states[17]])  # exact ties


def random_prior(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((3 * d, d)) * 0.1
    return a.T @ a


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("selector", ["fisher", "fisher-per-token"])
def test_torch_and_screened_numpy_pick_what_plain_greedy_picks(seed: int, selector: str) -> None:
    pool = pool_with_duplicates(40, 12, seed)
    prior = random_prior(12, seed) if seed % 2 else None
    per_token = selector == "fisher-per-token"
    budget = 200 if per_token else 25
    plain = plain_greedy_fisher(pool, budget, prior=prior, per_token=per_token)
    runs = {
        "torch": select(pool, budget, selector, prior=prior, backend="torch"),
        "numpy, screened": select(pool, budget, selector, prior=prior, settings=SCREENED),
        "numpy": select(pool, budget, selector, prior=prior),
    }
    for name, run in runs.items():
        np.testing.assert_array_equal(run.order, plain.order, err_msg=name)
        np.testing.assert_allclose(run.objective, plain.objective, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(run.gains, plain.gains, rtol=1e-9, err_msg=name)


def test_duplicates_tie_and_the_lowest_index_wins_on_every_backend() -> None:
    states = token_states(4, 8, 0) * 3  # every example three times
    pool = pool_from_tokens(states)
    numpy_order = select(pool, 12, "fisher").order
    assert sorted(numpy_order.tolist()) == list(range(12))
    for kwargs in ({"backend": "torch"}, {"settings": SCREENED}):
        np.testing.assert_array_equal(select(pool, 12, "fisher", **kwargs).order, numpy_order)


def test_extreme_settings_change_no_screened_pick() -> None:
    # single-example chunks and batches, a one-entry top segment, split threads, the widest
    # margins, and (torch) a device budget that fits one factor row per batch at d=200
    extreme = GreedySettings(
        chunk_rows=1,
        lazy_batch=1,
        bound_batch=1,
        top_segment=1,
        parallel_min=2,
        parallel_min_flops=1,
        screen_min_d=1,
        screen_safety=1e6,
        device_memory_mb=1,
    )
    pool = pool_with_duplicates(30, 200, 3)
    prior = random_prior(200, 3)
    plain = plain_greedy_fisher(pool, 12, prior=prior)
    for threads in (1, 2):
        tuned = select(pool, 12, "fisher", prior=prior, threads=threads, settings=extreme)
        np.testing.assert_array_equal(tuned.order, plain.order)
    streamed = select(pool, 12, "fisher", prior=prior, settings=extreme, backend="torch")
    np.testing.assert_array_equal(streamed.order, plain.order)


def test_screened_gains_are_within_their_margins_and_the_margins_are_narrow() -> None:
    # a realistic width and ridge (the benchmark's spectrum), at V before and after picks
    pool = pool_from_tokens(token_states(60, 128, 5, t_max=60))
    examples = np.arange(pool.N, dtype=np.int64)
    designs = [
        Design(pool, 1e-3, np.zeros((128, 128)), settings=SCREENED),
        TorchDesign(pool, 1e-3, np.zeros((128, 128)), "cpu", SCREENED),
    ]
    for design in designs:
        for _ in range(4):
            exact = design.gains(examples)
            value, margin = design.screen(examples)
            assert (np.abs(value - exact) <= margin).all()
            assert np.median(margin / exact) < 1e-4  # else the float64 checks pile up
            design.add(int(np.argmax(exact)))
    np.testing.assert_allclose(designs[1].logdet, designs[0].logdet, rtol=1e-12)


def test_torch_gains_equal_numpy_gains_and_updates() -> None:
    pool = pool_with_duplicates(40, 12, 7)
    prior = random_prior(12, 7)
    numpy_design = Design(pool, 1e-3, prior)
    torch_design = TorchDesign(pool, 1e-3, prior, "cpu")
    examples = np.arange(pool.N, dtype=np.int64)
    assert torch_design.start == numpy_design.start
    for i in (3, 11, 27, 40):  # 40 and 41 are copies of 5: a duplicate's gain after it
        np.testing.assert_allclose(torch_design.gains(examples), numpy_design.gains(examples))
        np.testing.assert_allclose(torch_design.add(i), numpy_design.add(i), rtol=1e-10)
    np.testing.assert_allclose(torch_design.logdet, numpy_design.logdet, rtol=1e-12)


def test_torch_batches_pad_little_and_stay_in_the_memory_budget() -> None:
    pool = pool_from_tokens(token_states(300, 16, 2, t_max=16))  # ranks 1..16
    design = TorchDesign(pool, 1e-3, np.zeros((16, 16)), "cpu")
    examples = np.random.default_rng(0).permutation(pool.N).astype(np.int64)
    seen = []
    for chunk, r in design._chunks(examples):
        ranks = pool.ranks[examples[chunk]]
        assert r == ranks.max()
        assert len(chunk) == 1 or len(chunk) * r <= (1 + MAX_PADDING) * ranks.sum()
        assert len(chunk) * r <= design._batch_rows
        seen.extend(chunk.tolist())
    assert sorted(seen) == list(range(pool.N))


class _Counted(Design):
    """A numpy design that counts the float64 gains it evaluates."""

    float64_gains = 0

    def gains(self, examples: np.ndarray) -> np.ndarray:
        self.float64_gains += len(examples)
        return super().gains(examples)


def test_the_screen_leaves_few_float64_gains_and_the_same_picks() -> None:
    pool = pool_from_tokens(token_states(200, 128, 6, t_max=60))
    prior = np.zeros((128, 128))
    screened = _Counted(pool, 1e-3, prior, settings=SCREENED)
    order, _ = lazy_greedy(screened, np.ones(pool.N), 20.0, progress=False)
    plain = plain_greedy_fisher(pool, 20, settings=SCREENED)
    np.testing.assert_array_equal(order, plain.order)
    assert screened.float64_gains <= 3 * 20  # without the screen: 200 + the lazy re-evaluations


class _OffScreen(Design):
    """A design whose float32 screen is wrong by more than the margin it claims."""

    @property
    def screens(self) -> bool:
        return True

    def screen(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.gains(examples) + 0.5, np.full(len(examples), 1e-6)


def test_a_screen_outside_its_margin_stops_the_selection() -> None:
    pool = pool_with_duplicates(20, 8, 1)
    design = _OffScreen(pool, 1e-3, np.zeros((8, 8)))
    with pytest.raises(RuntimeError, match="beyond its error margin"):
        lazy_greedy(design, np.ones(pool.N), 5.0, progress=False)


def test_backend_is_resolved_against_the_device_and_checked() -> None:
    assert resolve_backend("auto", "cpu") == "numpy"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", "cuda:1") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("numpy", "cuda") == "numpy"
    with pytest.raises(ValueError, match="select.backend"):
        load_config(None, ["select.backend=jax"])
    assert load_config(None, ["select.backend=torch"]).select.backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'jax'; known: numpy, torch"):
        select(pool_with_duplicates(20, 4, 0), 2, "fisher", backend="jax")


def test_select_subset_with_the_torch_backend_writes_the_numpy_selection(tmp_path: Path) -> None:
    features, table_path = write_pool_features(tmp_path)
    space = "model=test width=6"
    config = SelectConfig(selector="fisher", budget=8)  # the pool has no label factors
    first = select_subset(features, table_path, config, tmp_path / "first", space=space)
    prior = load_prior(Path(first.selection_path), "run-1", "select.prior")
    records = {}
    for backend in ("numpy", "torch", "auto"):  # warm-started: the prior joins the design
        config = SelectConfig(selector="fisher", budget=5, backend=backend)
        out_dir = tmp_path / backend
        ref = select_subset(
            features, table_path, config, out_dir, space=space, prior=prior, device="cpu"
        )
        records[backend] = json.loads(Path(ref.selection_path).read_text())
    assert records["auto"] == records["numpy"]  # auto on cpu is numpy
    assert records["torch"]["ids"] == records["numpy"]["ids"]
    assert records["torch"]["train_ids"] == records["numpy"]["train_ids"]
    np.testing.assert_allclose(records["torch"]["gains"], records["numpy"]["gains"], rtol=1e-9)
