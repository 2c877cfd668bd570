"""Greedy maximisation of the FisherSFT objective over a `Design`: lazy, and plain for reference.

Both pick by a score under sum(cost) <= budget and return the picks in order with each
pick's gain. The cost is 1 per example under an example budget and the loss tokens under a
token budget; the score is the gain (`fisher`, `fisher-label`: under a token budget the best
gain among the examples that still fit) or gain / cost (per_cost, `fisher-per-token`).

Lazy greedy (Minoux 1978, "Accelerated greedy algorithms for maximizing submodular set
functions"; the paper's "greedy with cached gains", docs/concepts/fishersft.md) keeps, for every
candidate, a cached score that upper-bounds its current score: f is submodular, so a gain
only shrinks as V grows, and Design's trace and Fischer bounds are valid for the current V
and every larger one. A score made exact at this step ("fresh") that is at least every
other bound is therefore the best, and only candidates whose bound could still tie the best
fresh score are ever re-evaluated.

The tie rule stays identical to plain greedy's: plain greedy takes the lowest index among
the scores within TIE_RTOL / TIE_ATOL of the best (baselines.first_best). Lazy greedy does
not stop at the first fresh top entry: it keeps making scores exact until no stale bound
reaches tie_floor(best), so every candidate that plain greedy would count as tied has a
fresh, exact score, and the pick is the lowest index among those. Both compute each gain
with the same Design route (chosen by the example's rank alone), so the scores compared are
bit-identical and so are the picks.

A design that `screens` (d >= GreedySettings.screen_min_d, or the torch design) first scores
stale candidates in float32 with an error margin (screen.py): a screened
score is an interval, its top a bound like any other and its bottom a score the step's best
is known to reach, which prunes the stale bounds below it. Only candidates whose interval
still reaches the tie floor get the float64 gain, so the pick and every score that could tie
it are still the float64 gains plain greedy compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from steps.selection.baselines import first_best, tie_floor
from steps.selection.greedy.design import Array, Design
from steps.selection.greedy.settings import GreedySettings
from steps.selection.pool import FeaturePool


class GreedyDesign(Protocol):
    """What lazy and plain greedy need of a design: `Design` (numpy) or `TorchDesign`."""

    pool: FeaturePool
    settings: GreedySettings
    start: float  # f(empty set)

    @property
    def cheap_bounds(self) -> NDArray[np.bool_]: ...

    @property
    def screens(self) -> bool: ...

    def gains(self, examples: NDArray[np.int64]) -> Array: ...

    def screen(self, examples: NDArray[np.int64]) -> tuple[Array, Array]: ...

    def add(self, example: int) -> float: ...


@dataclass
class _Scores:
    """Per candidate: an upper bound on its score (gain / divisor) and when it was exact or
    screened. A screened score lies in (value +- margin) / divisor, at that step only.
    divisor is the cost (per_cost) or 1; costs is what a pick spends of the budget."""

    bound: Array
    costs: Array
    divisor: Array
    exact_at: NDArray[np.int64]
    screened_at: NDArray[np.int64]
    value: Array
    margin: Array

    def record_screen(self, examples: NDArray[np.int64], step: int, design: GreedyDesign) -> None:
        value, margin = design.screen(examples)
        self.value[examples], self.margin[examples] = value, margin
        upper = (value + margin) / self.divisor[examples]  # the older bound may be tighter
        self.bound[examples] = np.minimum(self.bound[examples], upper)
        self.screened_at[examples] = step
        self.exact_at[examples[margin == 0]] = step  # no error to bound: the float64 gain

    def record_exact(self, examples: NDArray[np.int64], step: int, design: GreedyDesign) -> None:
        gains = design.gains(examples)
        checked = examples[self.screened_at[examples] == step]
        error = np.abs(gains[self.screened_at[examples] == step] - self.value[checked])
        off = error > self.margin[checked] + 1e-9 * np.abs(self.value[checked])
        if off.any():  # the margin is ~2,800x the largest error measured: never bad luck
            i = int(np.flatnonzero(off)[0])
            raise RuntimeError(
                f"float32 screen of example {checked[i]} is off by {error[i]:.3g}, beyond its "
                f"error margin {self.margin[checked[i]]:.3g}; a larger "
                "GreedySettings.screen_safety widens it, screen_min_d above d turns it off"
            )
        self.bound[examples] = gains / self.divisor[examples]
        self.exact_at[examples] = step

    def reached(self, examples: NDArray[np.int64], step: int) -> float:
        """A score this step's best reaches: the highest screened lower bound among examples
        (each candidate's screen is valid for the step it was made at)."""
        alive = (self.screened_at[examples] == step) & (self.bound[examples] > -np.inf)
        screened = examples[alive]
        if not len(screened):
            return -np.inf
        lower = (self.value[screened] - self.margin[screened]) / self.divisor[screened]
        return float(lower.max())


def lazy_greedy(
    design: GreedyDesign, costs: Array, budget: float, progress: bool, per_cost: bool = False
) -> tuple[list[int], list[float]]:
    """Greedy on the gain (gain / cost when per_cost) under sum(cost) <= budget,
    re-evaluating only candidates whose upper bound can still tie the best score.

    bound[i] always bounds i's current score from above (see the module docstring). Each
    step takes the highest stale bounds bound_batch at a time, tightens them (where that is
    cheaper than the gain), evaluates the lazy_batch highest still able to tie the best fresh
    score (screened in float32 first when the design screens: a float64 gain only where the
    screened interval still reaches the tie floor), and stops once no stale bound can: the
    same pick as plain greedy under the same tie rule.

    Work per step is O(top_segment), not O(N): steps look only at the `top` indices with
    the highest bounds; every other bound is <= `cutoff` and only shrinks, so the segment is
    rebuilt (one O(N) partition) only when cutoff could tie the step's best score.
    """
    n = design.pool.N
    everything = np.arange(n, dtype=np.int64)
    never = np.full(n, -1, np.int64)
    divisor = costs if per_cost else np.ones(n)
    scores = _Scores(
        np.full(n, np.inf), costs, divisor, never, never.copy(), np.zeros(n), np.zeros(n)
    )
    if design.screens:
        scores.record_screen(everything, 0, design)
    else:
        scores.record_exact(everything, 0, design)
    bound = scores.bound
    order: list[int] = []
    gains: list[float] = []
    remaining = budget
    segment = design.settings.top_segment
    top, cutoff = _top_segment(bound, costs, remaining, np.inf, segment)
    with tqdm(total=budget, disable=not progress, desc="fisher picks") as bar:
        for step in range(n):
            best, top, cutoff = _best_score(design, scores, step, top, cutoff, remaining)
            if best == -np.inf:
                break
            tied = top[(scores.exact_at[top] == step) & (bound[top] >= tie_floor(best))]
            pick = int(tied.min())  # the tie rule of plain greedy: the lowest index
            bound[pick] = -np.inf
            order.append(pick)
            gains.append(design.add(pick))
            remaining -= costs[pick]
            bar.update(costs[pick])
            if remaining <= 0 or len(order) == n:
                break
            too_costly = top[costs[top] > remaining]  # the budget only shrinks: never again
            bound[too_costly] = -np.inf
    return order, gains


def _top_segment(
    bound: Array, costs: Array, remaining: float, floor: float, segment: int
) -> tuple[NDArray[np.int64], float]:
    """Every index with bound >= floor plus the `segment` next highest, and a cutoff below
    floor that bounds every index left out."""
    bound[costs > remaining] = -np.inf
    size = int((bound >= floor).sum()) + segment
    if len(bound) <= size:
        return np.arange(len(bound), dtype=np.int64), -np.inf
    part = np.argpartition(-bound, size)
    return part[:size].astype(np.int64), float(bound[part[size]])


def _floor(best: float) -> float:
    return tie_floor(best) if best > -np.inf else -np.finfo(np.float64).max


def _best_score(
    design: GreedyDesign,
    scores: _Scores,
    step: int,
    top: NDArray[np.int64],
    cutoff: float,
    remaining: float,
) -> tuple[float, NDArray[np.int64], float]:
    """Make exact every score that could tie this step's best; return that best (-inf when
    nothing fits) and the top segment, rebuilt if the best fell to the cutoff.

    Screened scores prune too: the best reaches every screened lower bound, so a bound below
    the tie floor of `reached` cannot tie. The screened example that holds `reached` is never
    pruned by it (its bound is above it), so it is made exact before the step ends, and the
    step's best is then at least `reached`.
    """
    settings, bound, exact_at = design.settings, scores.bound, scores.exact_at
    while True:
        fresh = top[exact_at[top] == step]
        best = float(bound[fresh].max()) if len(fresh) else -np.inf
        reached = scores.reached(top, step) if design.screens else -np.inf  # O(top)
        candidates = top
        bound_batch, lazy_batch = settings.bound_batch, settings.lazy_batch
        while True:
            floor = _floor(max(best, reached))
            stale = candidates[(exact_at[candidates] != step) & (bound[candidates] >= floor)]
            candidates = stale
            if not len(stale):
                break
            if len(stale) > bound_batch:
                stale = stale[np.argpartition(-bound[stale], bound_batch - 1)[:bound_batch]]
            cheap = stale[design.cheap_bounds[stale] & (scores.screened_at[stale] != step)]
            if len(cheap) and max(best, reached) > -np.inf:  # no floor yet: nothing to prune
                assert isinstance(design, Design), "only numpy designs have cheap bounds"
                _tighten(design, bound, scores.divisor, cheap, floor)
                stale = stale[bound[stale] >= floor]
            if len(stale) > lazy_batch:  # the rest keep their tightened bounds
                stale = stale[np.argpartition(-bound[stale], lazy_batch - 1)[:lazy_batch]]
            # For small d, batches double within a step: when most bounds are loose (the
            # first picks, before V has full rank) that amortises per-call overhead over big
            # batches, at worst evaluating twice what a step needs. A d=768 gain costs ~10 ms,
            # far above the overhead: there, doubling only wasted evaluations.
            if design.pool.d <= settings.grow_max_d:
                bound_batch, lazy_batch = min(2 * bound_batch, 4096), min(2 * lazy_batch, 4096)
            unscreened = stale[scores.screened_at[stale] != step]
            if design.screens and len(unscreened):  # float64 only once all are screened
                scores.record_screen(unscreened, step, design)
                reached = max(reached, scores.reached(unscreened, step))
            elif len(stale):
                scores.record_exact(stale, step, design)
            just_exact = stale[exact_at[stale] == step]
            if len(just_exact):
                best = max(best, float(bound[just_exact].max()))
        if cutoff == -np.inf or (best > -np.inf and cutoff < tie_floor(best)):
            return best, top, cutoff
        floor = _floor(best)
        top, cutoff = _top_segment(bound, scores.costs, remaining, floor, settings.top_segment)


def _tighten(
    design: Design, bound: Array, divisor: Array, examples: NDArray[np.int64], floor: float
) -> None:
    """Lower examples' bounds in two tiers: the trace bound (d^2 / 2 flops from a cached
    Gram) for all, the tighter Fischer bound (+ 2 m d^2) only for those still >= floor."""
    trace = design.traces(examples)
    bound[examples] = np.minimum(
        bound[examples], design.trace_bounds(examples, trace) / divisor[examples]
    )
    alive = bound[examples] >= floor
    examples, trace = examples[alive], trace[alive]
    if len(examples):
        tight = design.bounds(examples, trace) / divisor[examples]
        bound[examples] = np.minimum(bound[examples], tight)


def plain_greedy(
    design: GreedyDesign, costs: Array, budget: float, progress: bool, per_cost: bool = False
) -> tuple[list[int], list[float]]:
    """Greedy on the gain (gain / cost when per_cost) under sum(cost) <= budget, recomputing
    every gain every step."""
    available = np.ones(design.pool.N, dtype=bool)
    divisor = costs if per_cost else np.ones(design.pool.N)
    order: list[int] = []
    gains: list[float] = []
    remaining = budget
    with tqdm(total=budget, disable=not progress, desc="plain greedy picks") as bar:
        while remaining > 0:
            candidates = np.flatnonzero(available & (costs <= remaining))
            if not len(candidates):
                break
            pick = int(candidates[first_best(design.gains(candidates) / divisor[candidates])])
            available[pick] = False
            order.append(pick)
            gains.append(design.add(pick))
            remaining -= costs[pick]
            bar.update(costs[pick])
    return order, gains
