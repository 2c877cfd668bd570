"""select.budget_tokens: every selector fills a token budget, fisher as brute force does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from flows.config import ConfigError, load_config
from steps.selection.baselines import fill_tokens
from steps.selection.greedy.design import GreedySettings
from steps.selection.pool import FeaturePool
from steps.selection.select import SelectConfig, select_subset
from steps.selection.selectors import SELECTORS, plain_greedy_fisher, select
from tests.conftest import write_pool_features
from tests.unit.test_selectors import make_pool, random_prior


def assert_fills(pool: FeaturePool, order: np.ndarray, budget: int) -> None:
    """Distinct picks within the budget, and no unpicked example fits in what is left."""
    used = int(pool.n_tokens[order].sum())
    assert len(set(order.tolist())) == len(order) > 0
    assert used <= budget
    unpicked = np.setdiff1d(np.arange(pool.N), order)
    assert (pool.n_tokens[unpicked] > budget - used).all()


@pytest.mark.parametrize("budget", [35, 180, 600])
@pytest.mark.parametrize("selector", list(SELECTORS))
def test_every_selector_fills_the_token_budget_maximally(selector: str, budget: int) -> None:
    pool = make_pool(40, 8, 3, t_min=1, t_max=40)
    target = pool.factors[:20] if selector == "fisher-target" else None  # any states will do
    chosen = select(pool, budget, selector, seed=2, token_budget=True, target=target)
    assert_fills(pool, chosen.order, budget)


def brute_force_token_fill(pool: FeaturePool, budget: int, ridge: float = 1e-3) -> list[int]:
    """Best log det gain among the examples that still fit, by slogdet, until none fits."""
    grams = [
        pool.factors[a:b].astype(np.float64).T @ pool.factors[a:b].astype(np.float64)
        for a, b in zip(pool.offsets[:-1], pool.offsets[1:], strict=True)
    ]
    design = ridge * np.eye(pool.d)
    chosen: list[int] = []
    left = budget
    while True:
        fits = [i for i in range(pool.N) if i not in chosen and pool.n_tokens[i] <= left]
        if not fits:
            return chosen
        logdets = np.array([np.linalg.slogdet(design + grams[i])[1] for i in fits])
        pick = fits[int(np.flatnonzero(logdets >= logdets.max() - 1e-9 * abs(logdets.max()))[0])]
        chosen.append(pick)
        design = design + grams[pick]
        left -= int(pool.n_tokens[pick])


@pytest.mark.parametrize("seed", range(4))
def test_fisher_under_a_token_budget_equals_brute_force(seed: int) -> None:
    pool = make_pool(14, 5, seed, t_min=1, t_max=12)
    budget = int(pool.n_tokens.sum()) // 3
    chosen = select(pool, budget, "fisher", token_budget=True)
    np.testing.assert_array_equal(chosen.order, brute_force_token_fill(pool, budget))
    assert_fills(pool, chosen.order, budget)


@pytest.mark.parametrize("top_segment", [2048, 1])  # 1: the top segment is rebuilt
@pytest.mark.parametrize("seed", range(3))
def test_lazy_token_fill_matches_plain_with_a_prior(seed: int, top_segment: int) -> None:
    pool = make_pool(50, 12, seed, t_min=1, t_max=30)
    prior = random_prior(12, seed)
    settings = GreedySettings(top_segment=top_segment)
    lazy = select(pool, 250, "fisher", prior=prior, settings=settings, token_budget=True)
    plain = plain_greedy_fisher(pool, 250, prior=prior, token_budget=True)
    np.testing.assert_array_equal(lazy.order, plain.order)
    np.testing.assert_allclose(lazy.gains, plain.gains, rtol=1e-9)


def test_fisher_under_a_token_budget_is_not_fisher_per_token() -> None:
    # Same budget, two rules: the best gain that fits vs the best gain per token.
    pool = make_pool(40, 8, 1, t_min=1, t_max=40)
    by_gain = select(pool, 200, "fisher", token_budget=True).order
    per_token = select(pool, 200, "fisher-per-token").order
    assert not np.array_equal(by_gain, per_token)
    # the gain rule favours long examples, the per-token rule short ones
    assert pool.n_tokens[by_gain].mean() > pool.n_tokens[per_token].mean()


def test_baselines_skip_what_does_not_fit_and_keep_going() -> None:
    pool = make_pool(30, 6, 4, t_min=1, t_max=30)
    budget = 100
    assert pool.base_loss is not None
    hardest = np.argsort(-pool.base_loss.astype(np.float64), kind="stable")
    kept, left = [], budget
    for i in hardest:  # the whole order, walked by hand
        if pool.n_tokens[i] <= left:
            kept.append(int(i))
            left -= int(pool.n_tokens[i])
    order = select(pool, budget, "highest-loss", token_budget=True).order
    np.testing.assert_array_equal(order, kept)
    assert pool.n_tokens[hardest[: len(kept)]].sum() > budget  # something was skipped


def test_fill_tokens_doubling_equals_filling_the_whole_order() -> None:
    rng = np.random.default_rng(0)
    n_tokens = rng.integers(1, 50, size=200).astype(np.int64)
    full = rng.permutation(200).astype(np.int64)
    asked: list[int] = []

    def order_of(k: int) -> np.ndarray:
        asked.append(k)
        return full[:k]

    kept = fill_tokens(order_of, n_tokens, 400)
    by_hand, left = [], 400
    for i in full:
        if n_tokens[i] <= left:
            by_hand.append(int(i))
            left -= int(n_tokens[i])
    np.testing.assert_array_equal(kept, by_hand)
    assert asked[0] < 200  # started from what can fit, not from the whole pool


def test_example_budget_and_tokens_still_mean_what_they_did() -> None:
    pool = make_pool(30, 6, 2)
    assert len(select(pool, 7, "uniform", seed=1).order) == 7
    np.testing.assert_array_equal(
        select(pool, 150, "fisher-per-token").order,
        select(pool, 150, "fisher-per-token", token_budget=True).order,
    )
    with pytest.raises(ValueError, match="fits no example"):
        select(pool, int(pool.n_tokens.min()) - 1, "uniform", token_budget=True)
    with pytest.raises(ValueError, match=r"exceeds the pool's \d+ tokens"):
        select(pool, int(pool.n_tokens.sum()) + 1, "fisher", token_budget=True)


def test_budget_keys_are_exclusive_and_the_example_default_stays() -> None:
    assert SelectConfig().budget == 0.1 and SelectConfig().budget_tokens is None
    assert SelectConfig(budget=None).budget == 0.1  # null: the default, unless tokens are set
    tokens = SelectConfig(budget_tokens=5000)
    assert tokens.budget is None and tokens.counts_tokens
    assert SelectConfig(selector="fisher-per-token").counts_tokens
    with pytest.raises(ValidationError, match=r"select\.budget=0\.2 and select\.budget_tokens="):
        SelectConfig(budget=0.2, budget_tokens=100)
    with pytest.raises(ValidationError, match="budget_tokens"):
        SelectConfig(budget_tokens=0)
    with pytest.raises(ConfigError, match=r"select\.budget=0\.3 and select\.budget_tokens=0\.1"):
        load_config(None, ["select.budget=0.3", "select.budget_tokens=0.1"])
    swapped = load_config(None, ["select.budget=null", "select.budget_tokens=0.1"])
    assert swapped.select.budget_setting == ("select.budget_tokens", 0.1)


def test_a_token_budget_is_resolved_recorded_and_named(tmp_path: Path) -> None:
    features, table = write_pool_features(tmp_path, n=40, d=6)
    total = features.loss_tokens
    config = SelectConfig(selector="k-center", budget_tokens=0.25)
    ref = select_subset(features, table, config, tmp_path / "s")
    record = json.loads(Path(ref.selection_path).read_text())
    assert record["budget_kind"] == ref.budget_kind == "tokens"
    assert record["budget"] == round(0.25 * total)
    assert ref.loss_tokens == record["loss_tokens"] <= record["budget"]
    examples = select_subset(
        features, table, SelectConfig(selector="fisher", budget=5), tmp_path / "e"
    )
    assert examples.budget_kind == "examples" and examples.examples == 5
    too_many = rf"select\.budget_tokens={total + 1} gives {total + 1} of the pool's {total} loss"
    with pytest.raises(ValueError, match=too_many):
        too = SelectConfig(selector="fisher", budget_tokens=total + 1)
        select_subset(features, table, too, tmp_path / "x")
