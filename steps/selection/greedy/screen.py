"""Float32 screening of FisherSFT gains, with a bound on its rounding error.

Pure numpy (and scipy's BLAS), no I/O. A low-rank gain is log det(I_r + F V^{-1} F^T) =
log det(I_r + Z Z^T) with Z = F R, R R^T = V^{-1} (R = chol(V^{-1}), lower triangular). The
product F R (r d^2 flops as a triangular multiply) runs in float32: F is
stored in float32 already, so only R is rounded; Z Z^T and the r x r Cholesky run in float64.

Lazy greedy (greedy.py) treats a screened value v as the interval v +- margin and asks for the
float64 gain only where that interval reaches the tie floor of the best gain, so the picks stay
plain greedy's as long as the margin bounds the error (`screen_margins` says how far it does).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import blas, lapack

from steps.selection.pool import FeaturePool

Array = NDArray[np.float64]

FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32


def screen_margins(ranks: Array, weighted: Array, d: int, unit: float, safety: float) -> Array:
    """Bound on |screened gain - exact gain| for Z = F R in float32, the rest in float64.

    weighted: s = sum_c (F^T F)_cc (V^{-1})_cc per example. Rounding errors of a product of
    inner dimension d, modelled as independent and mean-zero (Higham & Mary, "A new approach
    to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), leave each entry
    of dZ a standard deviation below u sqrt((d + 2) sum_c F_ac^2 R_cb^2) (the +2: rounding R
    to float32), so E ||dZ||_F^2 <= u^2 (d + 2) s. The gain g(Z) = log det(I + Z Z^T) has
    dg = 2 tr((I + ZZ^T)^{-1} Z dZ^T) with ||(I + ZZ^T)^{-1} Z||_2 <= 1/2, so |dg| <=
    ||dZ||_* <= sqrt(r) ||dZ||_F. The margin is safety * u sqrt(r (d + 2) s). Measured on the
    benchmark pool (d=768, ridge 1e-3, 150 examples at 8 points of 30 picks): the largest
    error was 0.003 of u sqrt(r (d + 2) s), the median 0.0004. The worst-case bound (|F||R|
    in place of these sums) was 1e6 times the largest error and 2% of the gain, which left a
    float64 check for every candidate within 2% of the best; this margin is 1e-5 to 1e-4.
    """
    return safety * unit * np.sqrt(ranks * (d + 2) * weighted) + 1e-12


class Float32Screen:
    """Screened gains of low-rank examples against one V^{-1}, refreshed after every pick."""

    def __init__(self, pool: FeaturePool, chunk_rows: int, safety: float) -> None:
        self.pool = pool
        self.chunk_rows = chunk_rows
        self.safety = safety
        self._upper: NDArray[np.float32] | None = None  # R^T, Fortran order, for strmm
        self._diagonal = np.zeros(pool.d)  # of V^{-1}

    def refresh(self, inverse: NDArray[np.floating]) -> None:
        """Factor the current V^{-1} (d^3 / 3 flops, once per pick)."""
        try:
            factor = np.linalg.cholesky(inverse)
        except np.linalg.LinAlgError as error:
            message = "V^{-1} is not positive definite: the design lost precision"
            raise ValueError(message) from error
        self._upper = factor.T.astype(np.float32, order="F")  # R^T, upper triangular
        self._diagonal = np.diagonal(inverse).copy()

    def screen(self, examples: NDArray[np.int64]) -> Array:
        """(n, 2): each example's float32 gain and the bound on its error.

        One triangular multiply per chunk of chunk_rows factor rows, whatever their ranks
        (a call per example measured 1.1-1.4x slower at d=768, 16 examples of r=64-256)."""
        pool, out = self.pool, np.empty((len(examples), 2))
        ends = np.cumsum(pool.ranks[examples])
        a = 0
        while a < len(examples):
            first = ends[a - 1] if a else 0
            b = max(a + 1, int(np.searchsorted(ends, first + self.chunk_rows, side="right")))
            out[a:b] = self._screen_chunk(examples[a:b])
            a = b
        return out

    def _screen_chunk(self, examples: NDArray[np.int64]) -> Array:
        assert self._upper is not None, "refresh() before screen()"
        pool, d = self.pool, self.pool.d
        f = pool.factors[pool.factor_rows(examples)]  # a float32 copy, overwritten below
        # float32 is plenty for a margin's scale, and 6x faster than einsum in float64
        row_weighted = (np.square(f) @ self._diagonal.astype(np.float32)).astype(np.float64)
        # Z^T = R^T F^T in place: F^T is F's memory in Fortran order, so nothing is copied
        z = blas.strmm(1.0, self._upper, f.T, side=0, lower=0, overwrite_b=1).T
        ranks = pool.ranks[examples]
        starts = np.concatenate([[0], np.cumsum(ranks)[:-1]])
        weighted = np.add.reduceat(row_weighted, starts)
        values = np.empty(len(examples))
        for i, (start, r) in enumerate(zip(starts, ranks, strict=True)):
            # Z Z^T in float64 (its error would scale with tr(B), which is >> the gain while
            # V is ridge-dominated): a syrk and a potrf per example on its rows of Z; gathering
            # equal ranks for a batched matmul and Cholesky measured 10% slower in all
            gram = blas.dsyrk(1.0, z[start : start + r].astype(np.float64).T, trans=1)
            gram.flat[:: r + 1] += 1.0
            upper, info = lapack.dpotrf(gram, lower=0, overwrite_a=1, clean=0)
            if info != 0:
                raise ValueError(
                    f"I + F V^-1 F^T of example {examples[i]} is not positive definite"
                )
            values[i] = 2.0 * np.log(np.diagonal(upper)).sum()
        margins = screen_margins(ranks.astype(np.float64), weighted, d, FLOAT32_UNIT, self.safety)
        return np.stack([values, margins], axis=1)
