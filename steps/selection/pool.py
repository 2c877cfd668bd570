"""The candidate pool: per-example sufficient statistics every selector reads.

Pure numpy, no I/O. `FeaturePool` holds each example's low-rank factor of its loss-token
Gram (docs/concepts/fishersft.md, "Algorithm": the pool streams sufficient statistics, never every
token's state); `pool_from_tokens` builds one from raw states, and `project` /
`random_projection` sketch it to fewer dimensions. `check_prior`, `check_ridge` and
`budget_costs` check the arguments every selector of selectors.py takes with a pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, eq=False)
class FeaturePool:
    """Per-example sufficient statistics of the pre-logit hidden states of loss-bearing tokens.

    Example i's low-rank factor F_i = factors[offsets[i]:offsets[i+1]] satisfies
    F_i.T @ F_i == sum_j x_ij x_ij^T, exactly or as a sketch, with 1 <= r_i <= d rows.
    label_factors, when the embed pass made them (embed.token_weight=label), are the same
    for the label-weighted Gram sum_j w_ij x_ij x_ij^T, row for row beside factors (a factor
    has min(T_i, d) rows either way, so offsets serve both); `fisher-label` reads them.
    """

    factors: NDArray[np.float32]  # (R, d)
    offsets: NDArray[np.int64]  # (N+1,), offsets[0] == 0, nondecreasing, offsets[-1] == R
    pooled: NDArray[np.float32]  # (N, d) mean over loss tokens, for fisher-pooled and k-center
    n_tokens: NDArray[np.int64]  # (N,) loss-bearing tokens per example
    base_loss: NDArray[np.float32] | None = None  # (N,) mean base-model loss per token
    label_factors: NDArray[np.float32] | None = None  # (R, d) label-weighted factors

    def __post_init__(self) -> None:
        _check_array("factors", self.factors, 2, np.float32)
        _check_array("offsets", self.offsets, 1, np.int64)
        _check_array("pooled", self.pooled, 2, np.float32)
        _check_array("n_tokens", self.n_tokens, 1, np.int64)
        n, (rows, d) = len(self.n_tokens), self.factors.shape
        if n == 0 or d == 0:
            raise ValueError(f"empty pool: {n} examples with hidden size d={d}")
        _check_shape("offsets", self.offsets, (n + 1,))
        _check_shape("pooled", self.pooled, (n, d))
        if self.offsets[0] != 0 or self.offsets[-1] != rows:
            raise ValueError(f"offsets must run from 0 to len(factors)={rows}")
        ranks = np.diff(self.offsets)
        fail_at(ranks < 0, "offsets decrease at example {i}")
        fail_at(ranks == 0, "example {i} has an empty factor (zero rows in factors)")
        fail_at(ranks > d, f"example {{i}} has more factor rows than d={d}")
        fail_at(self.n_tokens <= 0, "example {i} has n_tokens <= 0: no loss-bearing tokens")
        _check_finite_rows("factors", self.factors, self.offsets)
        fail_at(~np.isfinite(self.pooled).all(axis=1), "pooled[{i}] contains NaN or inf")
        if self.base_loss is not None:
            _check_array("base_loss", self.base_loss, 1, np.float32)
            _check_shape("base_loss", self.base_loss, (n,))
            fail_at(~np.isfinite(self.base_loss), "base_loss[{i}] is NaN or inf")
        if self.label_factors is not None:
            _check_array("label_factors", self.label_factors, 2, np.float32)
            _check_shape("label_factors", self.label_factors, self.factors.shape)
            _check_finite_rows("label_factors", self.label_factors, self.offsets)

    @property
    def N(self) -> int:
        return len(self.n_tokens)

    @property
    def d(self) -> int:
        return int(self.factors.shape[1])

    @cached_property
    def ranks(self) -> NDArray[np.int64]:
        """r_i, the number of factor rows of each example."""
        return np.diff(self.offsets)

    def factor_rows(self, examples: NDArray[np.int64]) -> NDArray[np.int64]:
        """Indices into factors of the given examples' rows, concatenated in that order."""
        ranks = self.ranks[examples]
        starts = np.repeat(self.offsets[examples] - np.cumsum(ranks) + ranks, ranks)
        return starts + np.arange(int(ranks.sum()))

    def subset(self, examples: NDArray[np.int64]) -> FeaturePool:
        """The pool restricted to `examples`, in that order (their factors copied)."""
        ranks = self.ranks[examples]
        rows = self.factor_rows(examples)
        return FeaturePool(
            factors=self.factors[rows],
            offsets=np.concatenate([[0], np.cumsum(ranks)]).astype(np.int64),
            pooled=self.pooled[examples],
            n_tokens=self.n_tokens[examples],
            base_loss=None if self.base_loss is None else self.base_loss[examples],
            label_factors=None if self.label_factors is None else self.label_factors[rows],
        )

    def label_weighted(self) -> FeaturePool:
        """The pool with the label-weighted factors in place of the plain ones."""
        if self.label_factors is None:
            raise ValueError(
                "the pool has no label-weighted statistics (label_factors): embed it with "
                "embed.token_weight=label"
            )
        return FeaturePool(
            self.label_factors, self.offsets, self.pooled, self.n_tokens, self.base_loss
        )


def _check_array(field: str, value: object, ndim: int, dtype: type[np.generic]) -> None:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{field} must be a numpy array, got {type(value).__name__}")
    if value.ndim != ndim or value.dtype != dtype:
        raise ValueError(
            f"{field} must be a {ndim}-d {np.dtype(dtype).name} array, "
            f"got {value.ndim}-d {value.dtype}"
        )


def _check_shape(field: str, value: NDArray[np.generic], shape: tuple[int, ...]) -> None:
    if value.shape != shape:
        raise ValueError(f"{field} has shape {value.shape}, expected {shape}")


def _check_finite_rows(
    field: str, factors: NDArray[np.float32], offsets: NDArray[np.int64]
) -> None:
    bad_rows = ~np.isfinite(factors).all(axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        example = int(np.searchsorted(offsets, row, side="right")) - 1
        raise ValueError(f"{field} of example {example} contain NaN or inf (row {row})")


def fail_at(bad: NDArray[np.bool_] | np.bool_, message: str) -> None:
    """Raise ValueError(message) naming the first example index where `bad` holds."""
    if np.any(bad):
        raise ValueError(message.format(i=int(np.flatnonzero(bad)[0])))


def factor_from_tokens(x: NDArray[np.floating]) -> NDArray[np.floating]:
    """(T, d) token states -> a factor F with F.T @ F == x.T @ x and min(T, d) rows.

    Returns x itself when T <= d; otherwise the d x d factor sqrt(w) U^T of the Gram's
    eigendecomposition (computed in float64, returned in x's dtype).
    """
    if x.ndim != 2:
        raise ValueError(f"token states must be (T, d), got shape {x.shape}")
    if x.shape[0] <= x.shape[1]:
        return x
    x64 = x.astype(np.float64)
    w, u = np.linalg.eigh(x64.T @ x64)
    return (np.sqrt(np.clip(w, 0.0, None))[:, None] * u.T).astype(x.dtype)


def pool_from_tokens(
    states: Sequence[NDArray[np.floating]],
    base_loss: NDArray[np.float32] | None = None,
    weights: Sequence[NDArray[np.floating]] | None = None,
) -> FeaturePool:
    """Build a FeaturePool from each example's (T_i, d) loss-token hidden states.

    weights: each example's (T_i,) token weights w >= 0; label_factors then factor
    sum_j w_j x_j x_j^T (each state scaled by sqrt(w) first, as the embed pass does).
    """
    factors = [factor_from_tokens(np.asarray(x, dtype=np.float32)) for x in states]
    pooled = np.stack([np.asarray(x, dtype=np.float64).mean(axis=0) for x in states])
    n_tokens = np.array([len(x) for x in states], dtype=np.int64)
    label = None
    if weights is not None:
        if len(weights) != len(states):
            raise ValueError(f"weights has {len(weights)} examples, states {len(states)}")
        label = [
            factor_from_tokens(np.asarray(x, np.float32) * _sqrt_weights(w, len(x), i))
            for i, (x, w) in enumerate(zip(states, weights, strict=True))
        ]
    return _pool_of(factors, pooled, n_tokens, base_loss, label)


def _sqrt_weights(w: NDArray[np.floating], tokens: int, example: int) -> NDArray[np.float32]:
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (tokens,) or not (np.isfinite(w) & (w >= 0)).all():
        raise ValueError(f"weights of example {example} must be {tokens} finite numbers >= 0")
    return np.sqrt(w).astype(np.float32)[:, None]


def _pool_of(
    factors: Sequence[NDArray[np.floating]],
    pooled: NDArray[np.floating],
    n_tokens: NDArray[np.int64],
    base_loss: NDArray[np.float32] | None,
    label_factors: Sequence[NDArray[np.floating]] | None = None,
) -> FeaturePool:
    return FeaturePool(
        factors=_stacked(factors),
        offsets=np.concatenate([[0], np.cumsum([len(f) for f in factors])]).astype(np.int64),
        pooled=pooled.astype(np.float32),
        n_tokens=n_tokens,
        base_loss=base_loss,
        label_factors=None if label_factors is None else _stacked(label_factors),
    )


def _stacked(factors: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
    return np.concatenate(factors).astype(np.float32)


def random_projection(d: int, dim: int, seed: int) -> NDArray[np.float32]:
    """Seeded (d, dim) Gaussian matrix P with N(0, 1/dim) entries, so E[P P^T] = I_d.

    Apply it to token states (x -> x @ P) as they stream out of the forward pass, so that
    no (T, d) state or d x d factor of a large pool is ever stored.
    """
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d, dim)) / np.sqrt(dim)).astype(np.float32)


def project(pool: FeaturePool, dim: int, seed: int) -> FeaturePool:
    """Johnson-Lindenstrauss sketch of the pool: every state x becomes P^T x.

    Each Gram becomes P^T (F_i^T F_i) P, so a gain costs about (d / dim)^2 less. For
    dim >> d, E[P P^T] = I leaves an O(d / dim) error on f(S) - f(empty); for dim < d the
    sketched f is a different number (fewer dimensions), but its greedy picks score nearly
    as well on the exact f (tests/unit/test_selectors.py and the benchmark measure both).
    Factors left with more than dim rows are re-factored to dim rows.
    """
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim}")
    p = random_projection(pool.d, dim, seed)
    spans = list(zip(pool.offsets[:-1], pool.offsets[1:], strict=True))
    factors = [factor_from_tokens(pool.factors[a:b] @ p) for a, b in spans]
    label = pool.label_factors  # a sketch of sum w x x^T is that of the scaled states
    label_factors = (
        None if label is None else [factor_from_tokens(label[a:b] @ p) for a, b in spans]
    )
    pooled = pool.pooled.astype(np.float64) @ p
    return _pool_of(factors, pooled, pool.n_tokens, pool.base_loss, label_factors)


def check_prior(prior: NDArray[np.floating] | None, d: int) -> NDArray[np.float64]:
    """The prior as a symmetric float64 (d, d) array (zeros when None); ValueError if not PSD."""
    if prior is None:
        return np.zeros((d, d))
    if not isinstance(prior, np.ndarray) or prior.shape != (d, d):
        shape = getattr(prior, "shape", type(prior).__name__)
        raise ValueError(f"prior must be a ({d}, {d}) array, got {shape}")
    p = prior.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("prior contains NaN or inf")
    scale = max(float(np.abs(p).max()), 1e-300)
    if np.abs(p - p.T).max() > 1e-6 * scale:
        raise ValueError("prior must be symmetric (a design matrix such as sum F_i^T F_i)")
    p = (p + p.T) / 2
    if np.linalg.eigvalsh(p)[0] < -1e-8 * scale:
        raise ValueError("prior must be positive semidefinite")
    return p


def check_ridge(ridge: float) -> None:
    """ValueError unless the selection ridge is a positive finite number."""
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge}")


def check_budget(budget: int, limit: int, unit: str) -> None:
    """ValueError unless budget is a whole count in 1..limit of `unit`."""
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise ValueError(f"budget must be an integer number of {unit}, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget} {unit}")
    if budget > limit:
        raise ValueError(f"budget of {budget} {unit} exceeds the pool's {limit} {unit}")


def budget_costs(pool: FeaturePool, budget: int, tokens: bool) -> NDArray[np.float64]:
    """What each example spends of a checked budget: 1, or its loss tokens."""
    if not tokens:
        check_budget(budget, pool.N, "examples")
        return np.ones(pool.N)
    check_budget(budget, int(pool.n_tokens.sum()), "tokens")
    if budget < pool.n_tokens.min():
        shortest = int(pool.n_tokens.min())
        raise ValueError(f"budget of {budget} tokens fits no example (shortest: {shortest})")
    return pool.n_tokens.astype(np.float64)
