"""fisher-label: label weights w = ||p - e_y||^2 and the weighted greedy, against brute force."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flows.config import ConfigError, load_config
from steps.selection.embedding.stats import label_weights
from steps.selection.pool import FeaturePool, pool_from_tokens, project
from steps.selection.selectors import fisher_objective, select
from tests.unit.test_selectors import token_states


def test_label_weights_are_one_minus_two_p_y_plus_the_sum_of_squares() -> None:
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits.double(), dim=-1).numpy()
    y = targets.numpy()
    by_hand = 1 - 2 * p[np.arange(50), y] + (p**2).sum(axis=1)
    got = label_weights(logits, targets).numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-7)
    assert ((got >= 0) & (got <= 2)).all()


def test_a_token_the_model_already_predicts_weighs_about_nothing() -> None:
    logits = torch.zeros(3, 1000)
    logits[0, 7] = 40.0  # p_y = 1 - 4e-15 in exact arithmetic
    logits[1, 7] = 40.0  # the same confidence on a wrong token: w = 2
    logits[2, 7] = 6.0  # unsure
    w = label_weights(logits, torch.tensor([7, 8, 7]))
    assert w[0] < 1e-12  # float32 1 - 2 p_y + p_y^2 would be rounding noise of ~1e-7
    assert w[1] == pytest.approx(2.0, abs=1e-6)
    assert 0.01 < w[2] < 1


def weighted_pool(n: int, d: int, seed: int, *, ones: bool = False) -> FeaturePool:
    states = token_states(n, d, seed, t_min=1, t_max=2 * d)
    rng = np.random.default_rng(seed + 5)
    weights = [np.ones(len(x)) if ones else 2 * rng.random(len(x)) ** 3 for x in states]
    return pool_from_tokens(states, weights=weights)


@pytest.mark.parametrize("token_budget", [False, True])
def test_with_every_weight_one_it_picks_what_fisher_picks(token_budget: bool) -> None:
    pool = weighted_pool(40, 8, 0, ones=True)
    budget = 200 if token_budget else 12
    label = select(pool, budget, "fisher-label", token_budget=token_budget)
    plain = select(pool, budget, "fisher", token_budget=token_budget)
    np.testing.assert_array_equal(label.order, plain.order)
    np.testing.assert_allclose(label.objective, plain.objective, rtol=1e-12)


def brute_force_weighted_greedy(
    states: list[np.ndarray],
    weights: list[np.ndarray],
    k: int,
    ridge: float = 1e-3,
    label_prior: np.ndarray | None = None,
) -> list[int]:
    """k times: the example whose sum_j w_j x_j x_j^T raises log det(ridge*I + label_prior +
    the chosen's) the most (slogdet)."""
    grams = [(x * w[:, None]).T @ x for x, w in zip(states, weights, strict=True)]
    design = ridge * np.eye(states[0].shape[1])
    if label_prior is not None:
        design = design + label_prior
    chosen: list[int] = []
    for _ in range(k):
        rest = [i for i in range(len(states)) if i not in chosen]
        logdets = np.array([np.linalg.slogdet(design + grams[i])[1] for i in rest])
        chosen.append(rest[int(np.flatnonzero(logdets >= logdets.max() - 1e-9)[0])])
        design = design + grams[chosen[-1]]
    return chosen


def _weighted_pool(seed: int):
    """16 examples of 1-10 five-wide token states with random label weights, as a pool."""
    states = token_states(16, 5, seed, t_min=1, t_max=10)
    rng = np.random.default_rng(seed + 9)
    weights = [2 * rng.random(len(x)) ** 3 for x in states]
    return states, weights, pool_from_tokens(states, weights=weights), rng


@pytest.mark.parametrize("seed", range(3))
def test_picks_equal_brute_force_weighted_greedy_and_report_the_plain_objective(
    seed: int,
) -> None:
    states, weights, pool, _ = _weighted_pool(seed)
    prior = np.eye(5) * 0.5
    chosen = select(pool, 6, "fisher-label", prior=prior)
    np.testing.assert_array_equal(chosen.order, brute_force_weighted_greedy(states, weights, 6))
    for t in range(6):  # the objective is the plain one, with the prior, as for every selector
        plain = fisher_objective(pool, chosen.order[: t + 1], prior=prior)
        np.testing.assert_allclose(chosen.objective[t], plain, rtol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_a_label_prior_joins_the_weighted_greedy_and_the_plain_prior_the_objective(
    seed: int,
) -> None:
    states, weights, pool, rng = _weighted_pool(seed)
    a = rng.standard_normal((5, 5))
    label_prior = a @ a.T * 2  # large against one example's Gram: it steers the picks
    prior = np.eye(5) * 0.5
    chosen = select(pool, 6, "fisher-label", prior=prior, label_prior=label_prior)
    expected = brute_force_weighted_greedy(states, weights, 6, label_prior=label_prior)
    np.testing.assert_array_equal(chosen.order, expected)
    for t in range(6):
        plain = fisher_objective(pool, chosen.order[: t + 1], prior=prior)
        np.testing.assert_allclose(chosen.objective[t], plain, rtol=1e-9)


def test_a_label_prior_is_read_by_fisher_label_only() -> None:
    pool = weighted_pool(10, 4, 2)
    with pytest.raises(ValueError, match="label_prior is read by fisher-label only, not by fisher"):
        select(pool, 3, "fisher", prior=np.eye(4), label_prior=np.eye(4))
    with pytest.raises(ValueError, match=r"prior must be a \(4, 4\) array"):
        select(pool, 3, "fisher-label", label_prior=np.eye(3))


def test_predicted_tokens_add_nothing_so_their_example_comes_last() -> None:
    # Two copies of each example's states: one with weights ~0 (every token predicted),
    # one with weight 1. Every well-predicted copy contributes ~nothing and is picked last.
    states = token_states(6, 6, 3, t_min=3, t_max=12)
    weights = [np.full(len(x), 1e-12) for x in states] + [np.ones(len(x)) for x in states]
    pool = pool_from_tokens(states + states, weights=weights)
    assert pool.label_factors is not None
    order = select(pool, 12, "fisher-label").order
    assert set(order[:6].tolist()) == set(range(6, 12))
    predicted = pool.label_factors[: pool.offsets[6]]
    assert np.abs(predicted).max() < 1e-4 * np.abs(pool.label_factors[pool.offsets[6] :]).max()


def test_label_factors_follow_subsets_and_sketches() -> None:
    pool = weighted_pool(20, 8, 1)
    assert pool.label_factors is not None
    rows = np.array([4, 0, 9], dtype=np.int64)
    part = pool.subset(rows)
    assert part.label_factors is not None
    np.testing.assert_array_equal(part.label_factors, pool.label_factors[pool.factor_rows(rows)])
    sketched = project(pool, 4, 0)
    assert sketched.label_factors is not None
    assert sketched.label_factors.shape == sketched.factors.shape
    assert len(select(sketched, 5, "fisher-label").order) == 5


def test_missing_or_bad_label_statistics_are_named() -> None:
    pool = weighted_pool(10, 4, 2)
    with pytest.raises(ValueError, match=r"fisher-label needs .* embed\.token_weight=label"):
        select(dataclasses.replace(pool, label_factors=None), 3, "fisher-label")
    assert pool.label_factors is not None
    with pytest.raises(ValueError, match="label_factors has shape"):
        dataclasses.replace(pool, label_factors=pool.label_factors[1:])
    bad = pool.label_factors.copy()
    bad[pool.offsets[3]] = np.nan
    with pytest.raises(ValueError, match="label_factors of example 3 contain NaN"):
        dataclasses.replace(pool, label_factors=bad)
    with pytest.raises(ValueError, match="weights of example 0 must be"):
        pool_from_tokens([np.ones((3, 4))], weights=[-np.ones(3)])


def test_fisher_label_without_label_statistics_fails_at_load_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"select\.selector=fisher-label .* embed\.token_weight"):
        load_config(None, ["select.selector=fisher-label", "embed.token_weight=none"])
    config = load_config(None, ["select.selector=fisher-label"])  # both are the defaults
    assert config.embed.token_weight == "label"
