"""FisherSFT selection: pick the examples whose hidden states carry the most information.

Pure math over numpy arrays, no I/O. From docs/fishersft.md, the objective is

    f(S) = log det(ridge*I + prior + V_S),   V_S = sum_{i in S} F_i^T F_i,

where F_i^T F_i = sum_j x_ij x_ij^T sums the pre-logit hidden states of example i's
loss-bearing tokens. f is monotone submodular, so greedy is within (1 - 1/e) of the best
set of the same size. `fisher` is the paper's "greedy with cached gains" (lazy greedy),
its cached bounds tightened by a trace bound and then a Fischer-inequality bound before any
exact re-evaluation, and `plain_greedy_fisher` the reference that recomputes every gain at
every step (with the same batched gain evaluation); both pick the same examples.

This module is the `SELECTORS` registry and `select()`. The pieces it wires together:
pool.py (the FeaturePool the selectors read), design.py (V, its gains and bounds, and the
GreedySettings that tune their speed), greedy.py (lazy and plain greedy) and baselines.py
(the compared selectors' pick orders and the tie rule).

Budgets count examples, or loss tokens (token_budget=True; `fisher-per-token`'s always do).
Under a token budget every selector fills it: `fisher` and `fisher-label` take the best gain
among the examples that still fit, `fisher-per-token` the best gain per token, and the
baselines walk their pick order keeping each example that fits and skipping, not stopping
at, one that does not (a knapsack fill). Each stops only once no unpicked example fits.

`fisher-label` weights each loss token's x x^T by w = ||p - e_y||^2 = 1 - 2 p_y + sum_c p_c^2
(p: the base model's prediction there, y: the true token), the token's share of the last
layer's empirical Fisher (p - e_y)(p - e_y)^T (x) x x^T (steps/selection/embedding/stats.py
computes w). Tokens the model already predicts add nothing. It picks by lazy greedy on
log det(ridge*I + label_prior + sum_i sum_j w_ij x_ij x_ij^T) (pool.label_factors), where
label_prior is the label-weighted counterpart of `prior` (a warm start's label_design.npy).

`fisher-target` minimises instead the mean leverage of a target sample's states (target=, an
(m, d) array), (1/m) sum_t z_t^T (ridge*I + prior + V_S)^{-1} z_t, by plain greedy
(steps/selection/targeted.py; V-optimal design is not submodular); under a token budget it
takes the best gain among the examples that fit. Selection.leverage holds that curve.

Conventions shared by every selector:
- Selection.objective[t] is the token-level, unweighted f after t+1 picks, and
  Selection.gains[t] its increase, so gains.cumsum() + f(empty) == objective for every
  selector and curves compare (for `fisher` and `fisher-per-token` that gain is also what
  made the pick; `fisher-label` picked by its weighted gain and reports the plain one).
- `prior` (a d x d PSD design, e.g. the Gram of what the current model was trained on)
  enters the objective of every selector; `fisher`, `fisher-per-token` and `fisher-target`
  select with it, `fisher-label` with `label_prior` instead (the same examples' label-weighted
  Gram; None: no prior in its picks), and the baselines only score with it.
- Gains within 1e-9 relative of the best tie, broken by the lowest index (see
  baselines.TIE_RTOL for why a tolerance).
- `ridge` is absolute, in squared hidden-state units: 1e-3 is small next to the per-token
  energy of un-normalised final-norm states (order 1 per coordinate).
- `threads`, `settings`, `backend` and `device` change how fast the fisher selectors run,
  never what they pick.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from steps.selection.baselines import PICK_ORDERS, PickOrder, fill_tokens
from steps.selection.greedy.design import Array, Design, GreedySettings, design_logdet
from steps.selection.greedy.search import GreedyDesign, lazy_greedy, plain_greedy
from steps.selection.greedy.torch_design import TorchDesign
from steps.selection.pool import FeaturePool, budget_costs, check_prior, check_ridge, fail_at
from steps.selection.targeted import target_greedy, target_moment

DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True, eq=False)
class Selection:
    """Chosen pool indices in pick order, each pick's gain and the objective after it."""

    order: NDArray[np.int64]  # (k,)
    gains: Array  # (k,) token-level log det increase of each pick
    objective: Array  # (k,) f(S_t) = log det(ridge*I + prior + V_{S_t}) after each pick
    # fisher-target only: (k + 1,) the target's mean leverage before any pick, then after each
    leverage: Array | None = None


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return threads


def default_threads() -> int:
    """The CPUs this process may run on, at most 4 (more measured no faster at d <= 768)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def fisher_objective(
    pool: FeaturePool,
    indices: Sequence[int] | NDArray[np.integer],
    ridge: float = DEFAULT_RIDGE,
    prior: NDArray[np.floating] | None = None,
) -> float:
    """f(S) = log det(ridge*I + prior + sum_{i in S} F_i^T F_i), freshly, in float64.

    An index listed twice counts twice.
    """
    check_ridge(ridge)
    design = ridge * np.eye(pool.d) + check_prior(prior, pool.d) + design_of(pool, indices)
    return design_logdet(design)


def design_of(pool: FeaturePool, indices: Sequence[int] | NDArray[np.integer]) -> Array:
    """V_S = sum_{i in S} F_i^T F_i in float64 (no ridge, no prior); a repeated index counts
    twice."""
    examples = np.asarray(indices, dtype=np.int64).reshape(-1)
    fail_at((examples < 0) | (examples >= pool.N), "index at position {i} is outside the pool")
    f = pool.factors[pool.factor_rows(examples)].astype(np.float64)
    return f.T @ f


MakeDesign = Callable[[FeaturePool, float, Array, int, GreedySettings | None, str], GreedyDesign]

# select(backend=) -> the design the fisher selectors run on (same picks; see torch_design.py)
DESIGNS: dict[str, MakeDesign] = {
    "numpy": lambda pool, ridge, prior, threads, settings, device: Design(
        pool, ridge, prior, threads, settings
    ),
    "torch": lambda pool, ridge, prior, threads, settings, device: TorchDesign(
        pool, ridge, prior, device, settings
    ),
}


def _selection(order: Sequence[int], gains: Sequence[float], design: GreedyDesign) -> Selection:
    gains_array = np.asarray(gains, dtype=np.float64)
    objective = design.start + np.cumsum(gains_array)
    return Selection(np.asarray(order, dtype=np.int64), gains_array, objective)


def _fisher(
    pool: FeaturePool,
    budget: int,
    ridge: float,
    prior: NDArray[np.floating] | None,
    progress: bool,
    *,
    per_token: bool,
    token_budget: bool,
    lazy: bool,
    threads: int | None,
    settings: GreedySettings | None,
    backend: str,
    device: str,
) -> Selection:
    check_ridge(ridge)
    costs = budget_costs(pool, budget, per_token or token_budget)
    if backend not in DESIGNS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(DESIGNS)}")
    prior_design = check_prior(prior, pool.d)
    design = DESIGNS[backend](pool, ridge, prior_design, _threads(threads), settings, device)
    greedy = lazy_greedy if lazy else plain_greedy
    picks = greedy(design, costs, float(budget), progress, per_cost=per_token)
    return _selection(*picks, design)


def plain_greedy_fisher(
    pool: FeaturePool,
    k: int,
    ridge: float = DEFAULT_RIDGE,
    prior: NDArray[np.floating] | None = None,
    *,
    per_token: bool = False,
    token_budget: bool = False,
    progress: bool = False,
    threads: int | None = None,
    settings: GreedySettings | None = None,
    backend: str = "numpy",
    device: str = "cpu",
) -> Selection:
    """Reference greedy that recomputes the gain of every remaining example at every step.

    O(k N r d^2); for tests and benchmarks. per_token=True makes it the reference of
    `fisher-per-token` (k is then a token budget), token_budget=True that of `fisher` under
    a token budget of k.
    """
    return _fisher(
        pool,
        k,
        ridge,
        prior,
        progress,
        per_token=per_token,
        token_budget=token_budget,
        lazy=False,
        threads=threads,
        settings=settings,
        backend=backend,
        device=device,
    )


def _greedy_selector(*, per_token: bool = False, label: bool = False) -> Selector:
    """A registry selector running lazy greedy (seed unused), one of:

    - `fisher`: the largest gain; under a token budget, among the examples that still fit.
    - `fisher-per-token` (per_token): the largest gain / n_tokens among the examples that
      fit in the tokens left, until none fits (cost-benefit greedy; on its own it carries no
      (1 - 1/e) guarantee). Its budget always counts loss tokens.
    - `fisher-label` (label): `fisher` on pool.label_factors with options.label_prior in
      place of the prior, its picks scored on the plain factors with the plain prior.
    """

    def selector(pool: FeaturePool, budget: int, options: SelectOptions) -> Selection:
        if label and pool.label_factors is None:
            raise ValueError(
                "fisher-label needs label-weighted statistics (pool.label_factors): embed the "
                "pool with embed.token_weight=label"
            )
        prior = options.prior
        chosen = _fisher(
            pool.label_weighted() if label else pool,
            budget,
            options.ridge,
            options.label_prior if label else prior,
            options.progress,
            per_token=per_token,
            token_budget=options.token_budget,
            lazy=True,
            threads=options.threads,
            settings=options.settings,
            backend=options.backend,
            device=options.device,
        )
        if not label:
            return chosen
        return _score_order(pool, chosen.order, options.ridge, prior, options.settings,
                            options.progress)  # fmt: skip

    return selector


def _score_order(
    pool: FeaturePool,
    order: NDArray[np.int64],
    ridge: float,
    prior: NDArray[np.floating] | None,
    settings: GreedySettings | None,
    progress: bool,
) -> Selection:
    """`order` with the plain objective after each pick (k serial Design updates)."""
    design = Design(pool, ridge, check_prior(prior, pool.d), settings=settings)
    gains = [design.add(int(i)) for i in tqdm(order, disable=not progress, desc="objective")]
    return _selection(order.tolist(), gains, design)


def _scored_selector(order_of: PickOrder) -> Selector:
    """A registry selector that picks in `order_of`'s order and scores the objective.

    Under a token budget it keeps the examples of that order that fit (fill_tokens).
    """

    def selector(pool: FeaturePool, budget: int, options: SelectOptions) -> Selection:
        # threads, settings' batching, backend and device are unused: scoring a given order
        # is k serial updates of a numpy Design
        check_ridge(options.ridge)
        budget_costs(pool, budget, options.token_budget)
        seed, ridge = options.seed, options.ridge
        if options.token_budget:
            order = fill_tokens(lambda k: order_of(pool, k, seed, ridge), pool.n_tokens, budget)
        else:
            order = order_of(pool, budget, seed, ridge)
        return _score_order(pool, order, ridge, options.prior, options.settings, options.progress)

    return selector


def _target_selector(pool: FeaturePool, budget: int, options: SelectOptions) -> Selection:
    """`fisher-target`: plain greedy on the decrease of the target states' mean leverage
    (steps/selection/targeted.py), with the prior; under a token budget, among the examples
    that still fit. Selection.leverage holds that leverage before and after each pick."""
    # threads, settings, backend and device are unused: numpy only, pruned by its own bound
    if options.target is None:
        raise ValueError(
            "fisher-target needs the target states (target=, an (m, d) array): set select.target"
        )
    check_ridge(options.ridge)
    costs = budget_costs(pool, budget, options.token_budget)
    prior_design = check_prior(options.prior, pool.d)
    moment = target_moment(options.target, pool.d)
    picks = target_greedy(
        pool, costs, float(budget), options.ridge, prior_design, moment, options.progress
    )
    return Selection(picks.order, np.diff(picks.logdet), picks.logdet[1:], picks.leverage)


@dataclass(frozen=True, eq=False)
class SelectOptions:
    """What select() passes every registry selector besides the pool and the budget."""

    ridge: float = DEFAULT_RIDGE
    seed: int = 0
    prior: NDArray[np.floating] | None = None
    progress: bool = False
    threads: int | None = None
    settings: GreedySettings | None = None
    backend: str = "numpy"
    device: str = "cpu"
    token_budget: bool = False
    target: NDArray[np.floating] | None = None
    # fisher-label's prior: the label-weighted Gram of what `prior` sums (None: no prior)
    label_prior: NDArray[np.floating] | None = None


Selector = Callable[[FeaturePool, int, SelectOptions], Selection]

SELECTORS: dict[str, Selector] = {
    "fisher": _greedy_selector(),
    "fisher-per-token": _greedy_selector(per_token=True),
    "fisher-label": _greedy_selector(label=True),
    "fisher-target": _target_selector,
    **{name: _scored_selector(order_of) for name, order_of in PICK_ORDERS.items()},
}


def select(
    pool: FeaturePool,
    budget: int,
    selector: str,
    *,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    prior: NDArray[np.floating] | None = None,
    progress: bool = False,
    threads: int | None = None,
    settings: GreedySettings | None = None,
    backend: str = "numpy",
    device: str = "cpu",
    token_budget: bool = False,
    target: NDArray[np.floating] | None = None,
    label_prior: NDArray[np.floating] | None = None,
) -> Selection:
    """Choose `budget` examples (tokens, for fisher-per-token) from the pool with `selector`.

    token_budget: `budget` counts loss tokens for every selector, each filling it (see the
    module docstring). threads: CPU threads for the fisher selectors' batched gains and
    bounds (None: up to 4 of the CPUs this process may use); settings: their batching,
    caching and bounding constants (None: GreedySettings()); backend: the DESIGNS entry they
    run on ("torch" on `device`). The picks depend on none of these. target: the (m, d)
    target states `fisher-target` reads (and no other selector: passing it to one is an error).
    label_prior: the (d, d) label-weighted counterpart of `prior` that `fisher-label` selects
    with (it alone reads it; None: it selects without a prior, and still scores with `prior`).
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")
    if target is not None and selector != "fisher-target":
        raise ValueError(f"target states are read by fisher-target only, not by {selector}")
    if label_prior is not None and selector != "fisher-label":
        raise ValueError(f"label_prior is read by fisher-label only, not by {selector}")
    options = SelectOptions(ridge, seed, prior, progress, threads, settings, backend, device,
                            token_budget, target, label_prior)  # fmt: skip
    return SELECTORS[selector](pool, budget, options)
