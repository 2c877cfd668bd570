"""Targeted (transductive) design: pick the examples that most lower the target's leverage.

Pure numpy, no I/O. Given Z, the (m, d) pre-logit states of a sample of the prompts a user
expects (never the eval split), `fisher-target` greedily minimises their mean leverage

    g(S) = (1/m) sum_t z_t^T V^{-1} z_t = trace(V^{-1} C),   V = ridge*I + prior + V_S,

with C = Z^T Z / m (V-optimal design; the error bound of docs/concepts/fishersft.md is stated in
these leverages), instead of maximising log det V. By Woodbury, adding example i (factor F, r x d)
lowers g by

    gain_i = trace((I_r + F V^{-1} F^T)^{-1} F A F^T),   A = V^{-1} C V^{-1}.

V-optimal's reduction is not submodular in general, so a gain cached at an earlier step
bounds nothing later and lazy greedy's shortcut does not hold: every step re-scores every
candidate. Within one step it is pruned exactly: I + F V^{-1} F^T >= I gives
gain_i <= trace(F A F^T), one (R, d) @ (d, q) product for the whole pool, and only the
candidates whose bound reaches the best exact gain so far get the r x r solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from steps.selection.baselines import first_best, tie_floor
from steps.selection.pool import FeaturePool

Array = NDArray[np.float64]

# Candidates scored exactly per batch, in descending order of their bound. Measured on one
# core, N=2,000 random anisotropic examples of 20-150 tokens, d=64, m=500, k=100: batches of
# 16 / 32 / 64 / 256 / 1024 took 4.1 / 4.1 / 2.8-3.3 / 5.6 / 20 s (N=5,000 at 32: 5.8 s).
# Once the bounds are tight a few candidates decide a step, so a large batch is wasted work.
EXACT_BATCH = 64
ROW_CHUNK = 1 << 16  # factor rows per block of the bound (bounded memory)
# Widens each bound past float32 rounding (and A's eigenvalues clipped at 0), so a bound is
# never below the exact gain: a wider bound only scores a few more candidates exactly.
BOUND_SLACK = 1e-3


@dataclass(frozen=True)
class TargetPicks:
    """Pick order, the log det after each pick (the shared objective) and the leverage."""

    order: NDArray[np.int64]  # (k,)
    logdet: Array  # (k + 1,) log det V before any pick, then after each
    leverage: Array  # (k + 1,) g(S): the target's mean leverage before any pick, then after each


def target_moment(target: NDArray[np.floating], d: int) -> Array:
    """C = Z^T Z / m of the (m, d) target states in float64; ValueError naming what is wrong."""
    if not isinstance(target, np.ndarray) or target.ndim != 2 or target.shape[1] != d:
        shape = getattr(target, "shape", type(target).__name__)
        raise ValueError(f"target must be an (m, {d}) array of target states, got {shape}")
    if len(target) == 0:
        raise ValueError("target holds no states (m = 0)")
    z = target.astype(np.float64)
    if not np.isfinite(z).all():
        row = int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
        raise ValueError(f"target row {row} contains NaN or inf")
    return z.T @ z / len(z)


def target_rows(target: FeaturePool) -> NDArray[np.float32]:
    """Rows whose mean x x^T is the token mean of an embedded target sample's states.

    The embed pass stores each prompt's factor (F^T F = sum of its states' x x^T, fewer rows
    than tokens), so the stacked factors, scaled by sqrt(rows / tokens), have
    Z^T Z / rows == sum_t x_t x_t^T / tokens: the objective depends on nothing else.
    """
    scale = np.sqrt(len(target.factors) / float(target.n_tokens.sum()))
    return (np.asarray(target.factors, dtype=np.float64) * scale).astype(np.float32)


def leverage(design: Array, moment: Array) -> float:
    """g = trace(design^{-1} C) for a positive definite design."""
    return float(np.trace(np.linalg.solve(design, moment)))


def exact_gains(pool: FeaturePool, examples: NDArray[np.int64], inverse: Array, a: Array) -> Array:
    """trace((I + F V^{-1} F^T)^{-1} F A F^T) of each example, batched over zero-padded factors
    (a zero row adds 1 to M's diagonal and nothing to F A F^T, so it changes no gain)."""
    f = _padded(pool, examples)  # (b, r, d)
    y = f @ inverse  # F V^{-1}
    m = np.eye(f.shape[1]) + y @ f.transpose(0, 2, 1)
    # trace(M^{-1} F A F^T) = sum((M^{-1} F V^{-1}) * (F V^{-1} C)): A = V^{-1} C V^{-1}
    solved = np.linalg.solve(m, f @ a)  # M^{-1} F A
    return np.einsum("brd,brd->b", solved, f)


def _padded(pool: FeaturePool, examples: NDArray[np.int64]) -> Array:
    ranks = pool.ranks[examples]
    out = np.zeros((len(examples), int(ranks.max()), pool.d))
    slot = np.repeat(np.arange(len(examples)), ranks)
    within = np.arange(int(ranks.sum())) - np.repeat(np.cumsum(ranks) - ranks, ranks)
    out[slot, within] = pool.factors[pool.factor_rows(examples)]
    return out


def gain_bounds(pool: FeaturePool, a: Array) -> Array:
    """trace(F_i A F_i^T) >= gain_i for every example, from A's square-root factor.

    In float32 (half the time of float64 on the pool's float32 factors); a sum of
    nonnegative terms, so its relative error stays near d * 6e-8, far inside BOUND_SLACK.
    """
    values, vectors = np.linalg.eigh((a + a.T) / 2)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))).astype(np.float32)  # root root^T = A
    row_energy = np.empty(len(pool.factors))
    for start in range(0, len(pool.factors), ROW_CHUNK):
        block = pool.factors[start : start + ROW_CHUNK] @ root
        row_energy[start : start + len(block)] = np.einsum("rq,rq->r", block, block)
    return np.add.reduceat(row_energy, pool.offsets[:-1]) * (1 + BOUND_SLACK)


def best_candidate(pool: FeaturePool, open_: NDArray[np.bool_], inverse: Array, a: Array) -> int:
    """The open example of largest gain, ties to the lowest index (first_best), scoring
    exactly only those whose bound can reach the best exact gain found."""
    bounds = np.where(open_, gain_bounds(pool, a), -np.inf)
    ranked = np.argsort(-bounds, kind="stable")[: int(open_.sum())]
    gains = np.full(pool.N, -np.inf)
    for start in range(0, len(ranked), EXACT_BATCH):
        batch = ranked[start : start + EXACT_BATCH]
        gains[batch] = exact_gains(pool, batch, inverse, a)
        following = start + EXACT_BATCH
        if following >= len(ranked) or bounds[ranked[following]] < tie_floor(gains.max()):
            break
    return first_best(gains)


def target_greedy(
    pool: FeaturePool,
    costs: Array,
    budget: float,
    ridge: float,
    prior: Array,
    moment: Array,
    progress: bool = False,
) -> TargetPicks:
    """Plain greedy on g's decrease among the examples whose cost still fits, until none fits.

    V is re-factored (Cholesky) at every step rather than downdated by Woodbury: O(d^3) per
    pick is nothing next to the pool's O(R d q) bound at d <= 256, and no error accumulates.
    """
    design = ridge * np.eye(pool.d) + prior
    order: list[int] = []
    logdets, leverages = [], []
    open_ = np.ones(pool.N, dtype=bool)
    left = budget
    bar = tqdm(total=budget, disable=not progress, desc="fisher-target")
    while True:
        chol = np.linalg.cholesky(design)
        inverse = _cho_inverse(chol)
        logdets.append(2.0 * float(np.log(np.diag(chol)).sum()))
        leverages.append(float(np.einsum("ij,ji->", inverse, moment)))
        open_ &= costs <= left
        if not open_.any():
            break
        pick = best_candidate(pool, open_, inverse, inverse @ moment @ inverse)
        open_[pick] = False
        order.append(pick)
        left -= costs[pick]
        bar.update(costs[pick])
        f = np.asarray(pool.factors[pool.offsets[pick] : pool.offsets[pick + 1]], np.float64)
        design = design + f.T @ f
    bar.close()
    return TargetPicks(np.asarray(order, np.int64), np.asarray(logdets), np.asarray(leverages))


def _cho_inverse(chol: NDArray[np.floating]) -> Array:
    """V^{-1} from V = L L^T, symmetrised."""
    eye = np.eye(len(chol))
    inv_l = np.linalg.solve(chol, eye)  # L^{-1}; d <= 256: a triangular solver buys nothing
    inverse = inv_l.T @ inv_l
    return (inverse + inverse.T) / 2
