"""FisherSFT selection: pick the examples whose hidden states carry the most information.

Pure math over numpy arrays, no I/O. From docs/fishersft.md, the objective is

    f(S) = log det(ridge*I + prior + V_S),   V_S = sum_{i in S} F_i^T F_i,

where F_i^T F_i = sum_j x_ij x_ij^T sums the pre-logit hidden states of example i's
loss-bearing tokens. f is monotone submodular, so greedy is within (1 - 1/e) of the best
set of the same size. `fisher` is the paper's "greedy with cached gains" (lazy greedy),
its cached bounds tightened by a trace bound and then a Fischer-inequality bound before any
exact re-evaluation, and
`plain_greedy_fisher` the reference that recomputes every gain at every step (with the same
batched gain evaluation); both pick the same examples. The compared selectors' pick
orders live in selectors_baselines.py.

Conventions shared by every selector:
- Selection.objective[t] is the token-level f after t+1 picks, and Selection.gains[t] its
  increase, so gains.cumsum() + f(empty) == objective for every selector (for `fisher`
  and `fisher-per-token` that gain is also what made the pick).
- `prior` (a d x d PSD design, e.g. the Gram of what the current model was trained on)
  enters the objective of every selector; only `fisher` and `fisher-per-token` select with it.
- Gains within 1e-9 relative of the best tie, broken by the lowest index (see
  selectors_baselines.TIE_RTOL for why a tolerance).
- `ridge` is absolute, in squared hidden-state units: 1e-3 is small next to the per-token
  energy of un-normalised final-norm states (order 1 per coordinate).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController
from tqdm import tqdm

from steps.selection.baselines import PICK_ORDERS, PickOrder, first_best, tie_floor

DEFAULT_RIDGE = 1e-3
_CHUNK_ROWS = 8192  # factor rows per batched gain evaluation: ~100 MB of temporaries at d=768
_LAZY_BATCH = 16  # stale heap entries re-evaluated at once: 8-32 measured equal, 1 is 1.6x slower
_BOUND_BATCH = 32  # stale entries whose trace bound is computed at once (d^2 flops each)
_GRAM_MIN_RANK = 0.5  # examples with r >= this * d get their gain from a d x d Cholesky
_GRAM_CACHE_BYTES = 2 * 2**30  # packed float64 Grams of high-rank examples kept if this fits
_BOUND_SLACK = 1e-6  # relative (and absolute) inflation of the cheap bound on a gain
_HEAD_ROWS = 8  # largest factor rows per example in the exact (Fischer) head of a bound
_GROW_MAX_D = 128  # widest d whose lazy batches grow within a step (see _best_score)
_TOP_SEGMENT = 2048  # highest bounds a lazy step scans; the rest only at a rebuild
_PARALLEL_MIN = 256  # examples per call from which gains and bounds are split across threads
_HEAD_CACHE_BYTES = 2**30  # float64 head rows kept; fewer rows per example when N d is large

Array = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class FeaturePool:
    """Per-example sufficient statistics of the pre-logit hidden states of loss-bearing tokens.

    Example i's low-rank factor F_i = factors[offsets[i]:offsets[i+1]] satisfies
    F_i.T @ F_i == sum_j x_ij x_ij^T, exactly or as a sketch, with 1 <= r_i <= d rows.
    """

    factors: NDArray[np.float32]  # (R, d)
    offsets: NDArray[np.int64]  # (N+1,), offsets[0] == 0, nondecreasing, offsets[-1] == R
    pooled: NDArray[np.float32]  # (N, d) mean over loss tokens, for fisher-pooled and k-center
    n_tokens: NDArray[np.int64]  # (N,) loss-bearing tokens per example
    base_loss: NDArray[np.float32] | None = None  # (N,) mean base-model loss per token

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
        _fail_at(ranks < 0, "offsets decrease at example {i}")
        _fail_at(ranks == 0, "example {i} has an empty factor (zero rows in factors)")
        _fail_at(ranks > d, f"example {{i}} has more factor rows than d={d}")
        _fail_at(self.n_tokens <= 0, "example {i} has n_tokens <= 0: no loss-bearing tokens")
        bad_rows = ~np.isfinite(self.factors).all(axis=1)
        if bad_rows.any():
            row = int(np.flatnonzero(bad_rows)[0])
            example = int(np.searchsorted(self.offsets, row, side="right")) - 1
            raise ValueError(f"factors of example {example} contain NaN or inf (row {row})")
        _fail_at(~np.isfinite(self.pooled).all(axis=1), "pooled[{i}] contains NaN or inf")
        if self.base_loss is not None:
            _check_array("base_loss", self.base_loss, 1, np.float32)
            _check_shape("base_loss", self.base_loss, (n,))
            _fail_at(~np.isfinite(self.base_loss), "base_loss[{i}] is NaN or inf")

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

    def subset(self, examples: NDArray[np.int64]) -> FeaturePool:
        """The pool restricted to `examples`, in that order (their factors copied)."""
        ranks = self.ranks[examples]
        return FeaturePool(
            factors=self.factors[_rows(self, examples)],
            offsets=np.concatenate([[0], np.cumsum(ranks)]).astype(np.int64),
            pooled=self.pooled[examples],
            n_tokens=self.n_tokens[examples],
            base_loss=None if self.base_loss is None else self.base_loss[examples],
        )


@dataclass(frozen=True, eq=False)
class Selection:
    """Chosen pool indices in pick order, each pick's gain and the objective after it."""

    order: NDArray[np.int64]  # (k,)
    gains: Array  # (k,) token-level log det increase of each pick
    objective: Array  # (k,) f(S_t) = log det(ridge*I + prior + V_{S_t}) after each pick


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


def _fail_at(bad: NDArray[np.bool_] | np.bool_, message: str) -> None:
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
    states: Sequence[NDArray[np.floating]], base_loss: NDArray[np.float32] | None = None
) -> FeaturePool:
    """Build a FeaturePool from each example's (T_i, d) loss-token hidden states."""
    factors = [factor_from_tokens(np.asarray(x, dtype=np.float32)) for x in states]
    pooled = np.stack([np.asarray(x, dtype=np.float64).mean(axis=0) for x in states])
    n_tokens = np.array([len(x) for x in states], dtype=np.int64)
    return _pool_of(factors, pooled, n_tokens, base_loss)


def _pool_of(
    factors: Sequence[NDArray[np.floating]],
    pooled: NDArray[np.floating],
    n_tokens: NDArray[np.int64],
    base_loss: NDArray[np.float32] | None,
) -> FeaturePool:
    return FeaturePool(
        factors=np.concatenate(factors).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum([len(f) for f in factors])]).astype(np.int64),
        pooled=pooled.astype(np.float32),
        n_tokens=n_tokens,
        base_loss=base_loss,
    )


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
    factors = [
        factor_from_tokens(pool.factors[a:b] @ p)
        for a, b in zip(pool.offsets[:-1], pool.offsets[1:], strict=True)
    ]
    pooled = pool.pooled.astype(np.float64) @ p
    return _pool_of(factors, pooled, pool.n_tokens, pool.base_loss)


def _check_prior(prior: NDArray[np.floating] | None, d: int) -> Array:
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


def _check_ridge(ridge: float) -> None:
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge}")


def _check_budget(budget: int, limit: int, unit: str) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise ValueError(f"budget must be an integer number of {unit}, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget} {unit}")
    if budget > limit:
        raise ValueError(f"budget of {budget} {unit} exceeds the pool's {limit} {unit}")


def _logdet(matrix: Array) -> float:
    sign, value = np.linalg.slogdet(matrix)
    if sign <= 0:
        raise ValueError("design matrix ridge*I + prior + V is not positive definite")
    return float(value)


def _rows(pool: FeaturePool, examples: NDArray[np.int64]) -> NDArray[np.int64]:
    """Indices into pool.factors of the given examples' rows, concatenated."""
    ranks = pool.ranks[examples]
    starts = np.repeat(pool.offsets[examples] - np.cumsum(ranks) + ranks, ranks)
    return starts + np.arange(int(ranks.sum()))


class _Design:
    """V = ridge*I + prior + sum of the picked F^T F, in float64, with V^{-1} kept current.

    After a pick of rank r, V^{-1} gets a Woodbury downdate (O(r d^2); at d=768 it measured
    10 ms for r=96 against 47 ms for a fresh inverse, and the same at r=d). Once the picks
    since the last fresh inverse add up to rank d, V is inverted afresh: without that the
    objective drifted 2e-8 (relative) from a fresh log det at ridge 1e-6, with it 2e-9.

    Gains are evaluated one of two ways, chosen per example by its rank alone, so that lazy
    and plain greedy compute bit-identical gains for the same example and V:
    - low rank (r < _GRAM_MIN_RANK * d): log det(I_r + F V^{-1} F^T), 2 r d^2 + 2 r^2 d flops;
    - high rank: log det(V + G) - log det V with G = F^T F, one batched d x d Cholesky
      (d^3 / 3 flops). G comes from a cache of the pool's high-rank Grams (upper triangles)
      built once when it fits in _GRAM_CACHE_BYTES, else is formed on the fly (2 r d^2 more
      flops). Only cached examples get cheap bounds (see bounds).
    """

    def __init__(self, pool: FeaturePool, ridge: float, prior: Array, threads: int = 1) -> None:
        self.pool = pool
        self.threads = threads
        self.gram = ridge * np.eye(pool.d) + prior
        self.start = _logdet(self.gram)  # f(empty set)
        self.logdet = self.start
        self.inverse = np.linalg.inv(self.gram)
        self._rank_since_inverse = 0
        self._by_gram = pool.ranks >= _GRAM_MIN_RANK * pool.d
        self._gram_slot = np.full(pool.N, -1, dtype=np.int64)
        # The cached Grams' upper triangles (row-major), float64: half the bytes of full
        # d x d Grams to page in and to stream through per trace, and exact.
        self._packed: Array | None = None
        upper = np.triu(np.ones((pool.d, pool.d), dtype=bool))
        self._upper = np.flatnonzero(upper)  # packed position -> flat d x d position
        position = np.zeros((pool.d, pool.d), dtype=np.int64)
        position[upper] = np.arange(len(self._upper))
        self._unpack = np.maximum(position, position.T).ravel()  # flat d x d -> packed
        self._off_diagonal = ~np.eye(pool.d, dtype=bool)[upper]
        self._weights = self._packed_weights()
        self._head: Array | None = None  # (cached, m, d) largest rows by slot, zero-padded
        self._head_rows = np.zeros(pool.N, dtype=np.int64)  # m_i = min(m, r_i) real rows
        self._cache_built = False  # built on the first gain or bound: add() never needs it

    def _build_cache(self) -> None:
        self._cache_built = True
        pool = self.pool
        high = np.flatnonzero(self._by_gram)
        if len(high) and len(high) * len(self._upper) * 8 <= _GRAM_CACHE_BYTES:
            self._packed = np.empty((len(high), len(self._upper)))
            high = high[np.argsort(pool.ranks[high], kind="stable")]  # equal ranks adjacent
            self._gram_slot[high] = np.arange(len(high))
            step = max(1, _CHUNK_ROWS // pool.d)
            chunks = [high[a : a + step] for a in range(0, len(high), step)]
            if self.threads > 1:
                list(_executor(self.threads).map(self._cache_grams, chunks))
            else:
                for chunk in chunks:
                    self._cache_grams(chunk)
        self._cheap = self._gram_slot >= 0
        self._build_head()

    def _cache_grams(self, chunk: NDArray[np.int64]) -> None:
        assert self._packed is not None
        for r in np.unique(self.pool.ranks[chunk]):
            same = chunk[self.pool.ranks[chunk] == r]
            flat = self._fresh_grams(same).reshape(len(same), -1)
            self._packed[self._gram_slot[same]] = np.take(flat, self._upper, axis=1)

    @property
    def cheap_bounds(self) -> NDArray[np.bool_]:
        """Examples whose bound costs well under their gain: a cached Gram gives the trace in
        d^2 flops; otherwise the trace alone costs as much as the gain's F V^{-1} F^T."""
        if not self._cache_built:
            self._build_cache()
        return self._cheap

    def _build_head(self) -> None:
        """The m largest factor rows (by norm) of each cached example, for Fischer bounds."""
        pool, slots = self.pool, np.flatnonzero(self._gram_slot >= 0)
        m = min(_HEAD_ROWS, _HEAD_CACHE_BYTES // (8 * max(len(slots), 1) * pool.d), pool.d)
        if m < 1 or not len(slots):
            return
        self._head = np.zeros((len(slots), m, pool.d))  # indexed by gram slot
        self._head_rows[slots] = np.minimum(pool.ranks[slots], m)
        for r in np.unique(pool.ranks[slots]):
            same = slots[pool.ranks[slots] == r]
            for a in range(0, len(same), max(1, _CHUNK_ROWS // int(r))):
                chunk = same[a : a + max(1, _CHUNK_ROWS // int(r))]
                f = pool.factors[_rows(pool, chunk)].reshape(len(chunk), int(r), pool.d)
                keep = min(m, int(r))
                norms = np.einsum("nrd,nrd->nr", f, f)
                top = np.argpartition(-norms, keep - 1, axis=1)[:, :keep]
                head = np.take_along_axis(f, top[:, :, None], axis=1)
                self._head[self._gram_slot[chunk], :keep] = head

    def _fresh_grams(self, examples: NDArray[np.int64]) -> Array:
        """F_i^T F_i of examples of equal rank, stacked (n, d, d), in float64."""
        r, d = int(self.pool.ranks[examples[0]]), self.pool.d
        f = self.pool.factors[_rows(self.pool, examples)].astype(np.float64)
        f = f.reshape(len(examples), r, d)
        return f.transpose(0, 2, 1) @ f

    def _split(
        self, compute: Callable[..., Array], examples: NDArray[np.int64], *per_example: Array
    ) -> Array:
        """compute(examples, *per_example) over contiguous parts on `threads` threads (numpy
        releases the GIL in gathers, BLAS and LAPACK); each example's value is computed alone,
        so the split changes no result beyond rounding. Small batches stay on this thread."""
        if not self._cache_built:
            self._build_cache()  # here, not in a worker: the threads share it
        if self.threads < 2 or len(examples) < _PARALLEL_MIN:
            return compute(examples, *per_example)
        parts = np.array_split(np.arange(len(examples)), min(self.threads, len(examples)))
        # One BLAS thread per worker: OpenBLAS's own threads on top oversubscribe the cores
        # (measured 8% slower than one thread when OPENBLAS_NUM_THREADS is unset).
        with _blas_controller().limit(limits=1, user_api="blas"):
            done = list(
                _executor(self.threads).map(
                    lambda part: compute(examples[part], *(a[part] for a in per_example)), parts
                )
            )
        return np.concatenate(done)

    def gains(self, examples: NDArray[np.int64]) -> Array:
        """The log det increase of V + F_i^T F_i over V for each example, batched."""
        return self._split(self._gains, examples)

    def _gains(self, examples: NDArray[np.int64]) -> Array:
        out = np.empty(len(examples))
        ranks = self.pool.ranks[examples]
        by_gram = self._by_gram[examples]
        # group by (route, rank); cached Grams need no equal rank, so they share one group
        keys = np.where(by_gram & (self._packed is not None), -1, ranks)
        if len(examples) * self.pool.d <= _CHUNK_ROWS and (keys == keys[0]).all():
            return self._gains_of_group(examples, int(keys[0]))  # the common small batch
        by_key = np.argsort(keys, kind="stable")
        group_starts = np.flatnonzero(np.diff(keys[by_key], prepend=-2))
        for start, stop in zip(group_starts, [*group_starts[1:], len(examples)], strict=True):
            key = int(keys[by_key[start]])
            step = max(1, _CHUNK_ROWS // (self.pool.d if key < 0 else key))
            for a in range(start, stop, step):
                chunk = by_key[a : min(a + step, stop)]
                out[chunk] = self._gains_of_group(examples[chunk], key)
        return out

    def _gains_of_group(self, examples: NDArray[np.int64], key: int) -> Array:
        """Gains of examples that share a route: key -1 = cached Grams, else their rank."""
        if key < 0:
            assert self._packed is not None
            packed = self._packed[self._gram_slot[examples]]
            d = self.pool.d
            return self._gains_from_grams(np.take(packed, self._unpack, axis=1).reshape(-1, d, d))
        if self._by_gram[examples[0]]:
            return self._gains_from_grams(self._fresh_grams(examples))
        return self._gains_of_rank(examples, key)

    def _gains_from_grams(self, grams: Array) -> Array:
        grams += self.gram  # grams is always a fresh temporary (fancy-indexed or computed)
        chol = np.linalg.cholesky(grams)
        return 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1) - self.logdet

    def _gains_of_rank(self, examples: NDArray[np.int64], r: int) -> Array:
        d = self.pool.d
        f = self.pool.factors[_rows(self.pool, examples)].astype(np.float64)
        b = (f @ self.inverse).reshape(len(examples), r, d)
        m = b @ f.reshape(len(examples), r, d).transpose(0, 2, 1)
        m += np.eye(r)
        chol = np.linalg.cholesky(m)
        return 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)

    def _packed_weights(self) -> Array:
        """Packed V^{-1} with off-diagonals doubled: <V^{-1}, G> = packed(G) @ this."""
        weights = np.asarray(self.inverse.reshape(-1)[self._upper], dtype=np.float64)
        weights[self._off_diagonal] *= 2.0
        return weights

    def traces(self, examples: NDArray[np.int64]) -> Array:
        """tr(V^{-1} F_i^T F_i): d^2 flops from a cached Gram, else 2 r d^2 from F_i."""
        return self._split(self._traces, examples)

    def _traces(self, examples: NDArray[np.int64]) -> Array:
        trace = np.empty(len(examples))
        cached = self._gram_slot[examples] >= 0
        if cached.any():
            assert self._packed is not None
            trace[cached] = self._packed[self._gram_slot[examples[cached]]] @ self._weights
        if not cached.all():
            rest = examples[~cached]
            f = self.pool.factors[_rows(self.pool, rest)].astype(np.float64)
            per_row = np.einsum("ij,ij->i", f @ self.inverse, f)
            starts = np.concatenate([[0], np.cumsum(self.pool.ranks[rest])[:-1]])
            trace[~cached] = np.add.reduceat(per_row, starts)
        return trace

    def trace_bounds(self, examples: NDArray[np.int64], trace: Array) -> Array:
        """The loose bound r log(1 + tr / r) (concavity of log over the r eigenvalues)."""
        ranks = self.pool.ranks[examples].astype(np.float64)
        return _inflate(ranks * np.log1p(np.clip(trace, 0.0, None) / ranks))

    def bounds(self, examples: NDArray[np.int64], trace: Array | None = None) -> Array:
        """Upper bounds on cached examples' gains, valid for this V and every larger one.

        The gain is log det(M), M = I_r + F V^{-1} F^T. Split F's rows into its m largest
        (the head, h) and the rest (the tail, t). Fischer's inequality for the PSD block
        matrix M gives log det M <= log det M_hh + log det M_tt, and AM-GM over M_tt's
        eigenvalues gives log det M_tt <= (r - m) log(1 + (tr - tr_h) / (r - m)), where
        tr = <V^{-1}, F^T F> (pass it when known) and tr_h = tr(M_hh) - m. The head term is
        exact (an m x m Cholesky, 2 m d^2 flops): the head rows are far from V^{-1}-orthogonal,
        and on the N=5,000 benchmark pool this left 3-23x fewer candidates able to tie than
        Hadamard's sum of log(1 + a_k) over 4 rows. When r <= m it is the gain itself. Both
        terms only shrink as V grows.
        """
        if trace is None:
            trace = self.traces(examples)
        return self._split(self._bounds, examples, trace)

    def _bounds(self, examples: NDArray[np.int64], trace: Array) -> Array:
        ranks = self.pool.ranks[examples]
        head_bound = np.zeros(len(examples))
        head_trace = np.zeros(len(examples))
        slots = self._gram_slot[examples]
        has_head = slots >= 0  # only cached examples keep head rows (_head_rows 0 elsewhere)
        if self._head is not None and has_head.any():
            head = self._head[slots[has_head]]  # zero rows: identity rows of M_hh
            n, m, d = head.shape
            scaled = (head.reshape(n * m, d) @ self.inverse).reshape(n, m, d)  # one GEMM
            block = scaled @ head.transpose(0, 2, 1)
            head_trace[has_head] = np.einsum("nii->n", block)
            block += np.eye(m)
            chol = np.linalg.cholesky(block)
            head_bound[has_head] = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        tail_rows = (ranks - self._head_rows[examples]).astype(np.float64)
        tail = np.clip(trace - head_trace, 0.0, None)
        tail_bound = tail_rows * np.log1p(tail / np.maximum(tail_rows, 1.0))
        return _inflate(head_bound + tail_bound)

    def add(self, example: int) -> float:
        """Add example's F^T F to V; return the gain (the log det increase)."""
        a, b = self.pool.offsets[example], self.pool.offsets[example + 1]
        f = self.pool.factors[a:b].astype(np.float64)
        fv = f @ self.inverse
        capacitance = np.eye(len(f)) + fv @ f.T
        gain = 2.0 * float(np.log(np.diagonal(np.linalg.cholesky(capacitance))).sum())
        self.gram += f.T @ f
        self.logdet = _logdet(self.gram)
        self._rank_since_inverse += len(f)
        if self._rank_since_inverse >= self.pool.d:
            self.inverse = np.linalg.inv(self.gram)
            self._rank_since_inverse = 0
        else:
            self.inverse -= fv.T @ np.linalg.solve(capacitance, fv)
        self.inverse = (self.inverse + self.inverse.T) / 2
        self._weights = self._packed_weights()  # d^2 / 2: cheaper than tracking staleness
        return gain


@cache
def _blas_controller() -> ThreadpoolController:
    """The loaded BLAS libraries (numpy's OpenBLAS), found once."""
    return ThreadpoolController()


@cache
def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool of worker threads per size, made on first use and kept for the process."""
    return ThreadPoolExecutor(threads, thread_name_prefix="sift-select")


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return threads


def default_threads() -> int:
    """The CPUs this process may run on, at most 4 (more measured no faster at d <= 768)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _inflate(bound: Array) -> Array:
    """A computed bound made safe against rounding in V^{-1} and in the sums."""
    return bound * (1.0 + _BOUND_SLACK) + _BOUND_SLACK


def _lazy_greedy(
    design: _Design, costs: Array, budget: float, progress: bool
) -> tuple[list[int], list[float]]:
    """Greedy on gain / cost under sum(cost) <= budget, re-evaluating only candidates whose
    upper bound can still tie the best score.

    bound[i] always bounds i's current score from above: gains only shrink as V grows
    (submodularity), and _Design.bounds gives a cheaper bound valid for the current V and
    every larger one. Each step takes the highest stale bounds _BOUND_BATCH at a time,
    tightens them (where that is cheaper than the gain), evaluates exactly the _LAZY_BATCH
    highest still able to tie the best fresh score, and stops once no stale bound can: the
    same pick as plain greedy under the same tie rule.

    Work per step is O(_TOP_SEGMENT), not O(N): steps look only at the `top` indices with
    the highest bounds; every other bound is <= `cutoff` and only shrinks, so the segment is
    rebuilt (one O(N) partition) only when cutoff could tie the step's best score.
    """
    n = design.pool.N
    bound = design.gains(np.arange(n, dtype=np.int64)) / costs
    exact_at = np.zeros(n, dtype=np.int64)  # the step at which bound[i] was exact
    order: list[int] = []
    gains: list[float] = []
    remaining = budget
    top, cutoff = _top_segment(bound, costs, remaining, np.inf)
    with tqdm(total=budget, disable=not progress, desc="fisher picks") as bar:
        for step in range(n):
            best, top, cutoff = _best_score(
                design, bound, costs, exact_at, step, top, cutoff, remaining
            )
            if best == -np.inf:
                break
            tied = top[(exact_at[top] == step) & (bound[top] >= tie_floor(best))]
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
    bound: Array, costs: Array, remaining: float, floor: float
) -> tuple[NDArray[np.int64], float]:
    """Every index with bound >= floor plus the _TOP_SEGMENT next highest, and a cutoff
    below floor that bounds every index left out."""
    bound[costs > remaining] = -np.inf
    size = int((bound >= floor).sum()) + _TOP_SEGMENT
    if len(bound) <= size:
        return np.arange(len(bound), dtype=np.int64), -np.inf
    part = np.argpartition(-bound, size)
    return part[:size].astype(np.int64), float(bound[part[size]])


def _best_score(
    design: _Design,
    bound: Array,
    costs: Array,
    exact_at: NDArray[np.int64],
    step: int,
    top: NDArray[np.int64],
    cutoff: float,
    remaining: float,
) -> tuple[float, NDArray[np.int64], float]:
    """Make exact every score that could tie this step's best; return that best (-inf when
    nothing fits) and the top segment, rebuilt if the best fell to the cutoff."""
    while True:
        fresh = top[exact_at[top] == step]
        best = float(bound[fresh].max()) if len(fresh) else -np.inf
        candidates = top
        bound_batch, lazy_batch = _BOUND_BATCH, _LAZY_BATCH
        while True:
            floor = tie_floor(best) if best > -np.inf else -np.finfo(np.float64).max
            stale = candidates[(exact_at[candidates] != step) & (bound[candidates] >= floor)]
            candidates = stale
            if not len(stale):
                break
            if len(stale) > bound_batch:
                stale = stale[np.argpartition(-bound[stale], bound_batch - 1)[:bound_batch]]
            cheap = stale[design.cheap_bounds[stale]]
            if len(cheap) and best > -np.inf:  # with no floor yet, bounds prune nothing
                _tighten(design, bound, costs, cheap, floor)
                stale = stale[bound[stale] >= floor]
            if len(stale) > lazy_batch:  # the rest keep their tightened bounds
                stale = stale[np.argpartition(-bound[stale], lazy_batch - 1)[:lazy_batch]]
            # For small d, batches double within a step: when most bounds are loose (the
            # first picks, before V has full rank) that amortises per-call overhead over big
            # batches, at worst evaluating twice what a step needs. A d=768 gain costs ~10 ms,
            # far above the overhead: there, doubling only wasted evaluations.
            if design.pool.d <= _GROW_MAX_D:
                bound_batch, lazy_batch = min(2 * bound_batch, 4096), min(2 * lazy_batch, 4096)
            if len(stale):
                bound[stale] = design.gains(stale) / costs[stale]
                exact_at[stale] = step
                best = max(best, float(bound[stale].max()))
        if cutoff == -np.inf or (best > -np.inf and cutoff < tie_floor(best)):
            return best, top, cutoff
        floor = tie_floor(best) if best > -np.inf else -np.finfo(np.float64).max
        top, cutoff = _top_segment(bound, costs, remaining, floor)


def _tighten(
    design: _Design, bound: Array, costs: Array, examples: NDArray[np.int64], floor: float
) -> None:
    """Lower examples' bounds in two tiers: the trace bound (d^2 / 2 flops from a cached
    Gram) for all, the tighter Fischer bound (+ 2 m d^2) only for those still >= floor."""
    trace = design.traces(examples)
    bound[examples] = np.minimum(
        bound[examples], design.trace_bounds(examples, trace) / costs[examples]
    )
    alive = bound[examples] >= floor
    examples, trace = examples[alive], trace[alive]
    if len(examples):
        tight = design.bounds(examples, trace) / costs[examples]
        bound[examples] = np.minimum(bound[examples], tight)


def _plain_greedy(
    design: _Design, costs: Array, budget: float, progress: bool
) -> tuple[list[int], list[float]]:
    """Greedy on gain / cost under sum(cost) <= budget, recomputing every gain every step."""
    available = np.ones(design.pool.N, dtype=bool)
    order: list[int] = []
    gains: list[float] = []
    remaining = budget
    with tqdm(total=budget, disable=not progress, desc="plain greedy picks") as bar:
        while remaining > 0:
            candidates = np.flatnonzero(available & (costs <= remaining))
            if not len(candidates):
                break
            pick = int(candidates[first_best(design.gains(candidates) / costs[candidates])])
            available[pick] = False
            order.append(pick)
            gains.append(design.add(pick))
            remaining -= costs[pick]
            bar.update(costs[pick])
    return order, gains


def _selection(order: Sequence[int], gains: Sequence[float], design: _Design) -> Selection:
    gains_array = np.asarray(gains, dtype=np.float64)
    objective = design.start + np.cumsum(gains_array)
    return Selection(np.asarray(order, dtype=np.int64), gains_array, objective)


def fisher_objective(
    pool: FeaturePool,
    indices: Sequence[int] | NDArray[np.integer],
    ridge: float = DEFAULT_RIDGE,
    prior: NDArray[np.floating] | None = None,
) -> float:
    """f(S) = log det(ridge*I + prior + sum_{i in S} F_i^T F_i), freshly, in float64.

    An index listed twice counts twice.
    """
    _check_ridge(ridge)
    return _logdet(ridge * np.eye(pool.d) + _check_prior(prior, pool.d) + design_of(pool, indices))


def design_of(pool: FeaturePool, indices: Sequence[int] | NDArray[np.integer]) -> Array:
    """V_S = sum_{i in S} F_i^T F_i in float64 (no ridge, no prior); a repeated index counts
    twice."""
    examples = np.asarray(indices, dtype=np.int64).reshape(-1)
    _fail_at((examples < 0) | (examples >= pool.N), "index at position {i} is outside the pool")
    f = pool.factors[_rows(pool, examples)].astype(np.float64)
    return f.T @ f


def _fisher(
    pool: FeaturePool,
    budget: int,
    ridge: float,
    prior: NDArray[np.floating] | None,
    progress: bool,
    *,
    per_token: bool,
    lazy: bool,
    threads: int | None,
) -> Selection:
    _check_ridge(ridge)
    costs = pool.n_tokens.astype(np.float64) if per_token else np.ones(pool.N)
    _check_budget(budget, int(costs.sum()), "tokens" if per_token else "examples")
    if budget < costs.min():
        raise ValueError(f"budget of {budget} tokens fits no example (shortest: {costs.min():.0f})")
    design = _Design(pool, ridge, _check_prior(prior, pool.d), _threads(threads))
    greedy = _lazy_greedy if lazy else _plain_greedy
    return _selection(*greedy(design, costs, float(budget), progress), design)


def plain_greedy_fisher(
    pool: FeaturePool,
    k: int,
    ridge: float = DEFAULT_RIDGE,
    prior: NDArray[np.floating] | None = None,
    *,
    per_token: bool = False,
    progress: bool = False,
    threads: int | None = None,
) -> Selection:
    """Reference greedy that recomputes the gain of every remaining example at every step.

    O(k N r d^2); for tests and benchmarks. per_token=True makes it the reference of
    `fisher-per-token` (k is then a token budget).
    """
    return _fisher(
        pool, k, ridge, prior, progress, per_token=per_token, lazy=False, threads=threads
    )


def select_fisher(
    pool: FeaturePool,
    budget: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    prior: NDArray[np.floating] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Selection:
    """`fisher`: lazy greedy on the token-level objective, `budget` examples (seed unused)."""
    return _fisher(
        pool, budget, ridge, prior, progress, per_token=False, lazy=True, threads=threads
    )


def select_fisher_per_token(
    pool: FeaturePool,
    budget: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    prior: NDArray[np.floating] | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Selection:
    """`fisher-per-token`: `budget` counts loss tokens, not examples (seed unused).

    Each step picks the largest gain / n_tokens among the examples that still fit in the
    tokens left, and stops when none fits (cost-benefit greedy, lazy like `fisher`; on its
    own it carries no (1 - 1/e) guarantee). Selection.gains holds the log det gains.
    """
    return _fisher(pool, budget, ridge, prior, progress, per_token=True, lazy=True, threads=threads)


def _scored_selector(order_of: PickOrder) -> Selector:
    """A registry selector that picks in `order_of`'s order and scores the objective."""

    def selector(
        pool: FeaturePool,
        budget: int,
        *,
        ridge: float = DEFAULT_RIDGE,
        seed: int = 0,
        prior: NDArray[np.floating] | None = None,
        progress: bool = False,
        threads: int | None = None,  # unused: scoring a given order is k serial updates
    ) -> Selection:
        _check_ridge(ridge)
        _check_budget(budget, pool.N, "examples")
        design = _Design(pool, ridge, _check_prior(prior, pool.d))
        order = order_of(pool, budget, seed, ridge)
        gains = [design.add(int(i)) for i in tqdm(order, disable=not progress, desc="objective")]
        return _selection(order.tolist(), gains, design)

    return selector


Selector = Callable[..., Selection]

SELECTORS: dict[str, Selector] = {
    "fisher": select_fisher,
    "fisher-per-token": select_fisher_per_token,
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
) -> Selection:
    """Choose `budget` examples (tokens, for fisher-per-token) from the pool with `selector`.

    threads: CPU threads for the fisher selectors' batched gains and bounds (None: up to 4
    of the CPUs this process may use); the picks do not depend on it.
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")
    run = SELECTORS[selector]
    return run(
        pool, budget, ridge=ridge, seed=seed, prior=prior, progress=progress, threads=threads
    )
