"""The design matrix V of a greedy FisherSFT selection: its gains, bounds and updates.

Pure numpy, no I/O. `Design` keeps V = ridge*I + prior + sum of the picked F_i^T F_i (the
matrix whose log det is the objective of docs/concepts/fishersft.md) with V^{-1} current, and
evaluates, batched, each candidate's gain and upper bounds on it, tuned by a
`GreedySettings` (settings.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import lapack, solve_triangular
from threadpoolctl import ThreadpoolController

from steps.selection.greedy.screen import Float32Screen
from steps.selection.greedy.settings import GreedySettings
from steps.selection.pool import FeaturePool

Array = NDArray[np.float64]


class Design:
    """V = ridge*I + prior + sum of the picked F^T F, in float64, with V^{-1} kept current.

    One per greedy selection: `gains(examples)` scores candidates against the current V and
    `add(example)` folds a pick into V, returning its gain; `start` is f(empty) and `logdet`
    the current f = log det V. For lazy greedy, `traces`, `trace_bounds` and `bounds` give
    upper bounds on gains that stay valid as V grows, and `cheap_bounds` marks the examples
    for which those cost well under a gain.

    After a pick of rank r, V^{-1} gets a Woodbury downdate (O(r d^2); at d=768 it measured
    10 ms for r=96 against 47 ms for a fresh inverse, and the same at r=d). Once the picks
    since the last fresh inverse add up to rank d, V is inverted afresh: without that the
    objective drifted 2e-8 (relative) from a fresh log det at ridge 1e-6, with it 2e-9.

    Gains are evaluated one of two ways, chosen per example by its rank alone, so that lazy
    and plain greedy compute bit-identical gains for the same example and V:
    - low rank (r < gram_min_rank * d): log det(I_r + F V^{-1} F^T), 2 r d^2 + 2 r^2 d flops;
    - high rank: log det(V + G) - log det V with G = F^T F, one batched d x d Cholesky
      (d^3 / 3 flops). G comes from a cache of the pool's high-rank Grams (upper triangles)
      built once when it fits in gram_cache_bytes, else is formed on the fly (2 r d^2 more
      flops). Only cached examples get cheap bounds (see bounds).
    For d >= screen_min_d, `screen` first scores low-rank examples in float32, with a bound
    on the error (screen.py); lazy greedy asks `gains` only near the top.
    """

    def __init__(
        self,
        pool: FeaturePool,
        ridge: float,
        prior: Array,
        threads: int = 1,
        settings: GreedySettings | None = None,
    ) -> None:
        """Start from V = ridge*I + prior (a checked symmetric PSD float64 (d, d) array).

        threads: worker threads for batched gains, bounds and the Gram cache (no pick
        depends on it); settings: the tuning constants, GreedySettings() when None.
        """
        self.pool = pool
        self.threads = threads
        self.settings = settings if settings is not None else GreedySettings()
        self.gram = ridge * np.eye(pool.d) + prior
        self.start = design_logdet(self.gram)  # f(empty set)
        self.logdet = self.start
        self.inverse, _ = _inverse_and_logdet(self.gram)
        self._rank_since_inverse = 0
        screens = pool.d >= self.settings.screen_min_d
        safety, rows = self.settings.screen_safety, self.settings.chunk_rows
        self._screen = Float32Screen(pool, rows, safety) if screens else None
        self._screen_current = False  # refreshed from V^{-1} at the first screen after a pick
        self._by_gram = pool.ranks >= self.settings.gram_min_rank * pool.d
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
        self._weights: Array | None = None  # packed V^{-1} for traces, made when first needed
        self._head: Array | None = None  # (cached, m, d) largest rows by slot, zero-padded
        self._head_rows = np.zeros(pool.N, dtype=np.int64)  # m_i = min(m, r_i) real rows
        self._cache_built = False  # built on the first gain or bound: add() never needs it

    def _build_cache(self) -> None:
        self._cache_built = True
        pool = self.pool
        high = np.flatnonzero(self._by_gram)
        if len(high) and len(high) * len(self._upper) * 8 <= self.settings.gram_cache_bytes:
            self._packed = np.empty((len(high), len(self._upper)))
            high = high[np.argsort(pool.ranks[high], kind="stable")]  # equal ranks adjacent
            self._gram_slot[high] = np.arange(len(high))
            step = max(1, self.settings.chunk_rows // pool.d)
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
        fit = self.settings.head_cache_bytes // (8 * max(len(slots), 1) * pool.d)
        m = min(self.settings.head_rows, fit, pool.d)
        if m < 1 or not len(slots):
            return
        self._head = np.zeros((len(slots), m, pool.d))  # indexed by gram slot
        self._head_rows[slots] = np.minimum(pool.ranks[slots], m)
        for r in np.unique(pool.ranks[slots]):
            same = slots[pool.ranks[slots] == r]
            step = max(1, self.settings.chunk_rows // int(r))
            for a in range(0, len(same), step):
                chunk = same[a : a + step]
                f = pool.factors[pool.factor_rows(chunk)].reshape(len(chunk), int(r), pool.d)
                keep = min(m, int(r))
                norms = np.einsum("nrd,nrd->nr", f, f)
                top = np.argpartition(-norms, keep - 1, axis=1)[:, :keep]
                head = np.take_along_axis(f, top[:, :, None], axis=1)
                self._head[self._gram_slot[chunk], :keep] = head

    def _fresh_grams(self, examples: NDArray[np.int64]) -> Array:
        """F_i^T F_i of examples of equal rank, stacked (n, d, d), in float64."""
        r, d = int(self.pool.ranks[examples[0]]), self.pool.d
        f = self.pool.factors[self.pool.factor_rows(examples)].astype(np.float64)
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
        flops = int(self.pool.ranks[examples].sum()) * self.pool.d**2
        small = flops < self.settings.parallel_min_flops or len(examples) < 2
        if self.threads < 2 or (len(examples) < self.settings.parallel_min and small):
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

    @property
    def screens(self) -> bool:
        """Whether `screen` computes in float32 (d >= screen_min_d); otherwise it is `gains`."""
        return self._screen is not None

    def screen(self, examples: NDArray[np.int64]) -> tuple[Array, Array]:
        """Each example's gain, screened in float32, and a bound on its error (0 where it is
        the float64 gain: high-rank examples, and every example when not `screens`)."""
        if self._screen is None:
            return self.gains(examples), np.zeros(len(examples))
        if not self._screen_current:
            self._screen.refresh(self.inverse)
            self._screen_current = True
        out = self._split(self._screened, examples)
        return out[:, 0], out[:, 1]

    def _screened(self, examples: NDArray[np.int64]) -> Array:
        assert self._screen is not None
        out = np.zeros((len(examples), 2))
        high = self._by_gram[examples]
        if high.any():
            out[high, 0] = self._gains(examples[high])
        if not high.all():
            out[~high] = self._screen.screen(examples[~high])
        return out

    def _gains(self, examples: NDArray[np.int64]) -> Array:
        out = np.empty(len(examples))
        ranks = self.pool.ranks[examples]
        by_gram = self._by_gram[examples]
        # group by (route, rank); cached Grams need no equal rank, so they share one group
        keys = np.where(by_gram & (self._packed is not None), -1, ranks)
        if len(examples) * self.pool.d <= self.settings.chunk_rows and (keys == keys[0]).all():
            return self._gains_of_group(examples, int(keys[0]))  # the common small batch
        by_key = np.argsort(keys, kind="stable")
        group_starts = np.flatnonzero(np.diff(keys[by_key], prepend=-2))
        for start, stop in zip(group_starts, [*group_starts[1:], len(examples)], strict=True):
            key = int(keys[by_key[start]])
            step = max(1, self.settings.chunk_rows // (self.pool.d if key < 0 else key))
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
        f = self.pool.factors[self.pool.factor_rows(examples)].astype(np.float64)
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
        if self._weights is None:
            self._weights = self._packed_weights()  # here, not in a worker thread
        return self._split(self._traces, examples)

    def _traces(self, examples: NDArray[np.int64]) -> Array:
        trace = np.empty(len(examples))
        cached = self._gram_slot[examples] >= 0
        if cached.any():
            assert self._packed is not None
            assert self._weights is not None
            trace[cached] = self._packed[self._gram_slot[examples[cached]]] @ self._weights
        if not cached.all():
            rest = examples[~cached]
            f = self.pool.factors[self.pool.factor_rows(rest)].astype(np.float64)
            per_row = np.einsum("ij,ij->i", f @ self.inverse, f)
            starts = np.concatenate([[0], np.cumsum(self.pool.ranks[rest])[:-1]])
            trace[~cached] = np.add.reduceat(per_row, starts)
        return trace

    def _inflate(self, bound: Array) -> Array:
        """A computed bound made safe against rounding in V^{-1} and in the sums."""
        slack = self.settings.bound_slack
        return bound * (1.0 + slack) + slack

    def trace_bounds(self, examples: NDArray[np.int64], trace: Array) -> Array:
        """The loose bound r log(1 + tr / r) (concavity of log over the r eigenvalues)."""
        ranks = self.pool.ranks[examples].astype(np.float64)
        return self._inflate(ranks * np.log1p(np.clip(trace, 0.0, None) / ranks))

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
        return self._inflate(head_bound + tail_bound)

    def add(self, example: int) -> float:
        """Add example's F^T F to V; return the gain (the log det increase).

        V^{-1} -= W^T W with W = L^{-1} F V^{-1}, L L^T = I + F V^{-1} F^T (Woodbury; W^T W and
        F^T F run as symmetric rank-r updates, so V and V^{-1} stay exactly symmetric).
        """
        a, b = self.pool.offsets[example], self.pool.offsets[example + 1]
        f = self.pool.factors[a:b].astype(np.float64)
        fv = f @ self.inverse
        lower = np.linalg.cholesky(np.eye(len(f)) + fv @ f.T)
        gain = 2.0 * float(np.log(np.diagonal(lower)).sum())
        self.gram += f.T @ f
        self.logdet += gain  # afresh with each fresh inverse: a log det per pick was 13 ms
        self._rank_since_inverse += len(f)
        self._screen_current = False
        self._weights = None
        if self._rank_since_inverse >= self.pool.d:
            self.inverse, self.logdet = _inverse_and_logdet(self.gram)
            self._rank_since_inverse = 0
        else:
            w = solve_triangular(lower, fv, lower=True, check_finite=False)
            self.inverse -= w.T @ w
        return gain


def _inverse_and_logdet(matrix: Array) -> tuple[Array, float]:
    """A fresh inverse and log det from one Cholesky (potri: 22 ms at d=768, inv alone 55)."""
    try:
        lower = np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError as error:
        raise ValueError("design matrix ridge*I + prior + V is not positive definite") from error
    inverse, info = lapack.dpotri(lower, lower=1)
    if info != 0:
        raise ValueError(f"inverting the design matrix failed (LAPACK dpotri info={info})")
    inverse = np.tril(inverse)
    inverse += np.tril(inverse, -1).T
    return inverse, 2.0 * float(np.log(np.diagonal(lower)).sum())


def design_logdet(matrix: Array) -> float:
    """log det of a design matrix; ValueError if it is not positive definite."""
    sign, value = np.linalg.slogdet(matrix)
    if sign <= 0:
        raise ValueError("design matrix ridge*I + prior + V is not positive definite")
    return float(value)


@cache
def _blas_controller() -> ThreadpoolController:
    """The loaded BLAS libraries (numpy's OpenBLAS), found once."""
    return ThreadpoolController()


@cache
def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool of worker threads per size, made on first use and kept for the process."""
    return ThreadPoolExecutor(threads, thread_name_prefix="sift-select")
