"""Pick orders of the selectors FisherSFT is compared against, as pure functions over arrays.

Each function returns pool indices in pick order; `steps.selection.selectors` wraps them into a
`Selection` and scores every order with the same token-level objective, so curves compare.
Under a token budget `fill_tokens` keeps the examples of an order that fit.
`pooled_fisher_order` is the sentence-level design of the DataFlex reimplementation
(docs/concepts/fishersft.md, "Known variants"): one L2-normalised mean vector per example.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from steps.selection.pool import FeaturePool

# Scores within this distance of the best count as ties, broken by the lowest index. Exact
# duplicates get the same score only up to rounding that depends on how candidates were
# batched; a tolerance far above rounding (~1e-15) makes every implementation agree. The
# fisher selectors share this rule (greedy.py says how lazy greedy keeps it).
TIE_RTOL = 1e-9
TIE_ATOL = 1e-12


def tie_floor(best: float) -> float:
    """Lowest score still tied with `best`."""
    return best - (TIE_RTOL * abs(best) + TIE_ATOL)


def first_best(scores: NDArray[np.float64]) -> int:
    """Lowest index whose score ties the maximum (NaN-free scores; -inf marks taken)."""
    return int(np.flatnonzero(scores >= tie_floor(float(scores.max())))[0])


def uniform_order(n: int, k: int, seed: int) -> NDArray[np.int64]:
    """k distinct indices drawn uniformly from range(n) with numpy's default_rng(seed)."""
    return np.random.default_rng(seed).choice(n, size=k, replace=False).astype(np.int64)


def longest_order(n_tokens: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """The k examples with the most loss-bearing tokens; ties by lowest index."""
    return np.argsort(-n_tokens, kind="stable")[:k].astype(np.int64)


def highest_loss_order(base_loss: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """The k examples the base model finds hardest (mean loss per token); ties by lowest index."""
    return np.argsort(-base_loss.astype(np.float64), kind="stable")[:k].astype(np.int64)


def k_center_order(points: NDArray[np.float32], k: int, seed: int) -> NDArray[np.int64]:
    """Greedy farthest-point coverage (the k-center core-set of Sener & Savarese, 2018).

    Starts from a seeded random point, then repeatedly adds the point farthest (Euclidean)
    from everything chosen so far; ties by lowest index. Never repeats an index, even when
    exact duplicates leave every remaining point at distance zero.
    """
    x = points.astype(np.float64)
    sq_norms = np.einsum("nd,nd->n", x, x)
    nearest = np.full(len(x), np.inf)  # squared distance to the closest chosen point
    taken = np.zeros(len(x), dtype=bool)
    order = [int(np.random.default_rng(seed).integers(len(x)))]
    for _ in range(k - 1):
        center = order[-1]
        taken[center] = True
        # |x - c|^2 expanded, so each step costs one matrix-vector product and no (N, d) temp.
        dist = np.maximum(sq_norms - 2.0 * (x @ x[center]) + sq_norms[center], 0.0)
        np.minimum(nearest, dist, out=nearest)
        order.append(first_best(np.where(taken, -np.inf, nearest)))
    return np.asarray(order, dtype=np.int64)


def pooled_fisher_order(pooled: NDArray[np.float32], k: int, ridge: float) -> NDArray[np.int64]:
    """Greedy max of log det(ridge*I + sum v v^T) over L2-normalised mean hidden states v.

    Each gain is log(1 + v^T V^{-1} v). Sherman-Morrison keeps V^{-1} current, and every
    candidate's quadratic form q = v^T V^{-1} v is downdated in place with one (N, d) @ (d,)
    product per pick, so a pick costs O(N d) instead of O(N d^2).
    """
    v = pooled.astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    if (norms == 0).any():
        index = int(np.flatnonzero(norms == 0)[0])
        raise ValueError(f"pooled[{index}] is all zeros: fisher-pooled cannot L2-normalise it")
    v /= norms[:, None]
    inverse = np.eye(v.shape[1]) / ridge
    quad = np.einsum("nd,nd->n", v, v) / ridge
    taken = np.zeros(len(v), dtype=bool)
    order = []
    for _ in range(k):
        pick = first_best(np.where(taken, -np.inf, quad))
        taken[pick] = True
        order.append(pick)
        u = inverse @ v[pick]
        denom = 1.0 + float(v[pick] @ u)
        inverse -= np.outer(u, u) / denom
        quad -= (v @ u) ** 2 / denom
    return np.asarray(order, dtype=np.int64)


def _highest_loss(pool: FeaturePool, k: int, seed: int, ridge: float) -> NDArray[np.int64]:
    if pool.base_loss is None:
        raise ValueError("highest-loss needs pool.base_loss (the base model's loss per example)")
    return highest_loss_order(pool.base_loss, k)


def fill_tokens(
    order_of: Callable[[int], NDArray[np.int64]], n_tokens: NDArray[np.int64], budget: int
) -> NDArray[np.int64]:
    """The examples of a pick order that fit in `budget` loss tokens, in order: each one
    that fits is kept, one that does not is skipped (the fill goes on), and the fill ends
    once no unpicked example fits.

    order_of(k) gives the first k of the order. The whole order costs O(N^2 d) for k-center
    and fisher-pooled, so k starts at the most examples any fill can hold and doubles until
    the fill is maximal; every order here is deterministic for its (k, seed).
    """
    n = len(n_tokens)
    k = max(1, int(np.searchsorted(np.cumsum(np.sort(n_tokens)), budget, side="right")))
    while True:
        order = order_of(min(k, n))
        fits = np.zeros(len(order), dtype=bool)
        left = budget
        for position, example in enumerate(order):
            if n_tokens[example] <= left:
                fits[position] = True
                left -= int(n_tokens[example])
        unvisited = np.setdiff1d(np.arange(n), order)
        if k >= n or not len(unvisited) or n_tokens[unvisited].min() > left:
            return order[fits]
        k *= 2


PickOrder = Callable[[FeaturePool, int, int, float], NDArray[np.int64]]  # (pool, k, seed, ridge)

# Registry names -> pick order; `seed` matters to uniform and k-center, `ridge` to fisher-pooled.
PICK_ORDERS: dict[str, PickOrder] = {
    "fisher-pooled": lambda pool, k, seed, ridge: pooled_fisher_order(pool.pooled, k, ridge),
    "uniform": lambda pool, k, seed, ridge: uniform_order(pool.N, k, seed),
    "longest": lambda pool, k, seed, ridge: longest_order(pool.n_tokens, k),
    "highest-loss": _highest_loss,
    "k-center": lambda pool, k, seed, ridge: k_center_order(pool.pooled, k, seed),
}
