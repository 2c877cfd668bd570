"""fisher-target (steps/selection/targeted.py) against brute force, and its settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from steps.selection import targeted
from steps.selection.pool import FeaturePool, pool_from_tokens
from steps.selection.select import SelectConfig
from steps.selection.selectors import fisher_objective, select
from steps.selection.target_sample import reject_target_in_pipeline
from tests.conftest import write_pool_features

RIDGE = 1e-3


def random_pool(n: int = 30, d: int = 5, seed: int = 0) -> FeaturePool:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 2.0, d)  # anisotropic, so directions differ in worth
    return pool_from_tokens(
        [rng.standard_normal((int(t), d)) * scales for t in rng.integers(1, 3 * d, size=n)]
    )


def gram(pool: FeaturePool, i: int) -> np.ndarray:
    f = pool.factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
    return f.T @ f


def brute_leverage(design: np.ndarray, target: np.ndarray) -> float:
    return float(np.trace(target @ np.linalg.inv(design) @ target.T)) / len(target)


def brute_greedy(pool, target, costs, budget, prior=None) -> list[int]:
    """Greedy with a fresh numpy inverse per candidate; ties to the lowest index."""
    design = RIDGE * np.eye(pool.d) + (0 if prior is None else prior)
    order: list[int] = []
    left = budget
    while True:
        fits = [i for i in range(pool.N) if i not in order and costs[i] <= left]
        if not fits:
            return order
        now = brute_leverage(design, target)
        gains = {i: now - brute_leverage(design + gram(pool, i), target) for i in fits}
        best = max(gains.values())
        pick = min(i for i, g in gains.items() if g >= best - 1e-9 * abs(best) - 1e-12)
        order.append(pick)
        left -= costs[pick]
        design = design + gram(pool, pick)


def test_gain_is_the_drop_in_brute_force_leverage():
    pool, rng = random_pool(), np.random.default_rng(1)
    target = rng.standard_normal((12, pool.d))
    design = RIDGE * np.eye(pool.d) + gram(pool, 0) + gram(pool, 3)
    inverse = np.linalg.inv(design)
    moment = targeted.target_moment(target, pool.d)
    examples = np.arange(pool.N)
    gains = targeted.exact_gains(pool, examples, inverse, inverse @ moment @ inverse)
    before = brute_leverage(design, target)
    expected = [before - brute_leverage(design + gram(pool, i), target) for i in examples]
    np.testing.assert_allclose(gains, expected, rtol=1e-8, atol=1e-10)
    bounds = targeted.gain_bounds(pool, inverse @ moment @ inverse)
    assert (bounds >= gains).all()


@pytest.mark.parametrize("with_prior", [False, True])
def test_picks_equal_brute_force_greedy(with_prior):
    pool, rng = random_pool(n=25, seed=2), np.random.default_rng(3)
    target = rng.standard_normal((9, pool.d))
    prior = gram(pool, 0) * 0.5 if with_prior else None
    chosen = select(pool, 8, "fisher-target", target=target, prior=prior)
    assert chosen.order.tolist() == brute_greedy(pool, target, np.ones(pool.N), 8, prior)


def test_leverage_curve_is_brute_force_and_never_rises():
    pool, rng = random_pool(n=40, seed=4), np.random.default_rng(5)
    target = rng.standard_normal((20, pool.d))
    chosen = select(pool, 15, "fisher-target", target=target)
    assert chosen.leverage is not None and len(chosen.leverage) == 16
    assert (np.diff(chosen.leverage) <= 1e-12).all()
    design = RIDGE * np.eye(pool.d)
    for t, i in enumerate(chosen.order):
        design = design + gram(pool, int(i))
        assert chosen.leverage[t + 1] == pytest.approx(brute_leverage(design, target), rel=1e-8)


def test_objective_is_the_shared_log_det_convention():
    pool, rng = random_pool(seed=6), np.random.default_rng(7)
    chosen = select(pool, 10, "fisher-target", target=rng.standard_normal((5, pool.d)))
    start = fisher_objective(pool, [], RIDGE)
    np.testing.assert_allclose(start + np.cumsum(chosen.gains), chosen.objective, rtol=1e-10)
    for t in range(len(chosen.order)):
        exact = fisher_objective(pool, chosen.order[: t + 1], RIDGE)
        assert chosen.objective[t] == pytest.approx(exact, rel=1e-9)


def test_targets_in_one_cluster_pick_from_that_cluster_first():
    rng, d = np.random.default_rng(8), 6
    mask = np.r_[np.ones(3), np.zeros(3)]  # cluster 0 lives in the first 3 coordinates
    states = [rng.standard_normal((4, d)) * (mask if i % 2 == 0 else 1 - mask) for i in range(40)]
    pool = pool_from_tokens(states)
    target = rng.standard_normal((30, d)) * (1 - mask)  # the odd examples' cluster
    chosen = select(pool, 6, "fisher-target", target=target)
    assert all(int(i) % 2 == 1 for i in chosen.order)


def test_token_budget_fill_is_within_the_budget_and_maximal():
    pool, rng = random_pool(n=30, seed=9), np.random.default_rng(10)
    target = rng.standard_normal((10, pool.d))
    budget = int(pool.n_tokens.sum() * 0.3)
    chosen = select(pool, budget, "fisher-target", target=target, token_budget=True)
    spent = int(pool.n_tokens[chosen.order].sum())
    assert spent <= budget
    unpicked = np.setdiff1d(np.arange(pool.N), chosen.order)
    assert len(unpicked) == 0 or pool.n_tokens[unpicked].min() > budget - spent
    costs = pool.n_tokens.astype(np.float64)
    assert chosen.order.tolist() == brute_greedy(pool, target, costs, budget)


def test_target_rows_keep_the_token_mean_of_an_embedded_sample():
    rng = np.random.default_rng(11)
    states = [rng.standard_normal((int(t), 4)) for t in (2, 9, 5)]  # one prompt factored
    rows = targeted.target_rows(pool_from_tokens(states)).astype(np.float64)
    tokens = np.concatenate(states)
    np.testing.assert_allclose(
        targeted.target_moment(rows, 4), tokens.T @ tokens / len(tokens), rtol=1e-5
    )


def test_select_subset_reads_target_features(tmp_path: Path):
    from steps.selection.select import select_subset

    features, table = write_pool_features(tmp_path / "pool")
    target, _ = write_pool_features(tmp_path / "target", n=6, seed=1)
    config = SelectConfig(selector="fisher-target", budget=5, target="prompts.jsonl")
    ref = select_subset(features, table, config, tmp_path / "out", target=target)
    assert ref.examples == 5 and Path(ref.plot_path).is_file()
    with pytest.raises(ValueError, match="select.target='prompts.jsonl' was not embedded"):
        select_subset(features, table, config, tmp_path / "out2")


def test_settings_name_both_keys():
    with pytest.raises(ValidationError, match="fisher-target needs select.target"):
        SelectConfig(selector="fisher-target")
    with pytest.raises(ValidationError, match="select.target=p.jsonl is read only by.*fisher"):
        SelectConfig(selector="fisher", target="p.jsonl")
    config = SelectConfig(selector="fisher-target", target="p.jsonl")
    with pytest.raises(ValueError, match="pipeline does not embed a target sample"):
        reject_target_in_pipeline(config)
    reject_target_in_pipeline(SelectConfig())  # the default selector runs in the pipeline


def test_select_errors_name_the_target():
    pool = random_pool()
    with pytest.raises(ValueError, match="fisher-target needs the target states"):
        select(pool, 3, "fisher-target")
    with pytest.raises(ValueError, match="fisher-target only, not by fisher"):
        select(pool, 3, "fisher", target=np.ones((2, pool.d)))
    with pytest.raises(ValueError, match=r"target must be an \(m, 5\) array"):
        select(pool, 3, "fisher-target", target=np.ones((2, 4)))
