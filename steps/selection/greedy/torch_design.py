"""The design matrix V of a greedy FisherSFT selection on a torch device (`select.backend`).

The numpy `Design` (design.py) computed with torch, on `device` (cuda or cpu), for the same
lazy greedy (greedy.py) and so the same picks. V, V^{-1} and R = chol(V^{-1}) stay in float64
on the device; `screen` evaluates gains in float32 (Z = F R, as screen.py,
with its error margins) and `gains` in float64, which lazy greedy asks for only where a
screened interval still reaches the best gain's tie floor. A pick updates V^{-1} in place
(Woodbury, as Design), with a fresh inverse from a Cholesky once the picks add up to rank d.

Memory is bounded by settings.device_memory_mb: the factors are copied to the device once
when they fit in half of it, else gathered from the (memory-mapped) pool per batch; batches
of padded factor rows are sized to the rest. There is no Gram cache and no Fischer bound here
(`cheap_bounds` is all False): the float32 screen is this design's cheap tier.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from numpy.typing import NDArray

from steps.selection.greedy.design import Array, design_logdet
from steps.selection.greedy.screen import screen_margins
from steps.selection.greedy.settings import GreedySettings
from steps.selection.pool import FeaturePool

# Unit roundoff of float32 matmuls under torch's matmul precision: "high" allows TF32 (10
# mantissa bits) and "medium" bfloat16 (7), so the margins hold under any setting.
FLOAT32_UNITS = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}
# Padding a batch of mixed ranks to its largest may add at most this share of rows.
MAX_PADDING = 0.125


class TorchDesign:
    """V = ridge*I + prior + sum of the picked F^T F on `device`, screened in float32."""

    screens = True

    def __init__(
        self,
        pool: FeaturePool,
        ridge: float,
        prior: Array,
        device: str,
        settings: GreedySettings | None = None,
    ) -> None:
        """Start from V = ridge*I + prior (a checked symmetric PSD float64 (d, d) array)."""
        self.pool = pool
        self.settings = settings if settings is not None else GreedySettings()
        self.device = torch.device(device)
        gram = ridge * np.eye(pool.d) + prior
        self.start = design_logdet(gram)  # f(empty set), as Design computes it
        self.logdet = self.start
        self.gram = torch.as_tensor(gram, dtype=torch.float64, device=self.device)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(self.gram))
        self._rank_since_inverse = 0
        self._factor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cheap_bounds = np.zeros(pool.N, dtype=bool)
        self._unit = FLOAT32_UNITS[torch.get_float32_matmul_precision()]
        if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            self._unit = max(self._unit, FLOAT32_UNITS["high"])
        budget = self.settings.device_memory_mb * 2**20 - 4 * 8 * pool.d**2  # V, V^-1, R
        resident = self.device.type != "cpu" and pool.factors.nbytes <= budget // 2
        self._resident = self._copy_factors() if resident else None
        budget -= pool.factors.nbytes if resident else 0
        # per padded row of a float64 batch: F in float32 and float64, Z, and the r x r Gram
        self._batch_rows = max(1, budget // (32 * pool.d))

    def _copy_factors(self) -> torch.Tensor:
        """The pool's factors on the device, copied a block at a time (bounded host memory)."""
        factors = self.pool.factors
        out = torch.empty(factors.shape, dtype=torch.float32, device=self.device)
        step = max(1, 2**26 // (4 * self.pool.d))  # 64 MiB blocks
        for a in range(0, len(factors), step):
            out[a : a + step] = torch.from_numpy(np.array(factors[a : a + step]))
        return out

    def gains(self, examples: NDArray[np.int64]) -> Array:
        """The log det increase of V + F_i^T F_i over V for each example, in float64."""
        return self._evaluate(examples, torch.float64)[0]

    def screen(self, examples: NDArray[np.int64]) -> tuple[Array, Array]:
        """Each example's gain in float32 (Z = F R) and the bound on its error."""
        values, weighted = self._evaluate(examples, torch.float32)
        ranks = self.pool.ranks[examples].astype(np.float64)
        margins = screen_margins(
            ranks, weighted, self.pool.d, self._unit, self.settings.screen_safety
        )
        return values, margins

    def _evaluate(self, examples: NDArray[np.int64], dtype: torch.dtype) -> tuple[Array, Array]:
        """Gains of examples with R in `dtype` (the Gram and Cholesky in float64), and
        sum_c (F^T F)_cc (V^{-1})_cc per example (the error scale of a float32 screen)."""
        chol, chol32, diagonal = self._current_factor()
        values, weighted = np.empty(len(examples)), np.zeros(len(examples))
        for chunk, r in self._chunks(examples):
            f = self._padded(examples[chunk], r)  # (n, r, d) float32, zero rows pad
            if dtype == torch.float32:
                z = (f @ chol32).double()
                weighted[chunk] = (f.square() @ diagonal).sum(dim=1).cpu().numpy()
            else:
                z = f.double() @ chol
            gram = z @ z.transpose(1, 2)  # zero rows give identity rows: no change to log det
            gram.diagonal(dim1=1, dim2=2).add_(1.0)
            diag = torch.linalg.cholesky(gram).diagonal(dim1=1, dim2=2)
            values[chunk] = (2.0 * diag.log().sum(dim=1)).cpu().numpy()
        return values, weighted

    def _current_factor(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R = chol(V^{-1}) in float64 and float32, and diag(V^{-1}) in float32, refreshed
        after each pick (d^3 / 3 flops)."""
        if self._factor is None:
            chol = torch.linalg.cholesky(self.inverse)
            diagonal = self.inverse.diagonal().float()
            self._factor = (chol, chol.float(), diagonal)
        return self._factor

    def _chunks(self, examples: NDArray[np.int64]) -> Iterator[tuple[NDArray[np.int64], int]]:
        """Positions of examples in batches of near-equal rank (sorted), each with the rank
        it is padded to: at most MAX_PADDING more rows, at most _batch_rows in all."""
        ranks = self.pool.ranks[examples]
        by_rank = np.argsort(ranks, kind="stable")
        sorted_ranks = ranks[by_rank]
        start = 0
        while start < len(examples):
            window = sorted_ranks[start : start + self._batch_rows]
            padded = np.arange(1, len(window) + 1) * window
            fits = (padded <= self._batch_rows) & (padded <= (1 + MAX_PADDING) * np.cumsum(window))
            stop = start + max(1, int(np.argmin(fits)) if not fits.all() else len(window))
            yield by_rank[start:stop], int(sorted_ranks[stop - 1])
            start = stop

    def _padded(self, examples: NDArray[np.int64], r: int) -> torch.Tensor:
        """The examples' factors as (n, r, d) float32 on the device, zero rows after each."""
        pool = self.pool
        rows = pool.factor_rows(examples)
        if self._resident is not None:
            flat = self._resident[torch.as_tensor(rows, device=self.device)]
        else:
            flat = torch.from_numpy(pool.factors[rows]).to(self.device)
        ranks = torch.as_tensor(pool.ranks[examples], device=self.device)
        slot = torch.repeat_interleave(torch.arange(len(examples), device=self.device), ranks)
        first = torch.repeat_interleave(torch.cumsum(ranks, 0) - ranks, ranks)
        within = torch.arange(len(rows), device=self.device) - first
        out = torch.zeros((len(examples), r, pool.d), dtype=torch.float32, device=self.device)
        out[slot, within] = flat
        return out

    def add(self, example: int) -> float:
        """Add example's F^T F to V; return the gain (the log det increase)."""
        a, b = self.pool.offsets[example], self.pool.offsets[example + 1]
        f = torch.from_numpy(np.array(self.pool.factors[a:b])).to(self.device).double()
        fv = f @ self.inverse
        capacitance = fv @ f.T
        capacitance.diagonal().add_(1.0)
        lower = torch.linalg.cholesky(capacitance)
        gain = float(2.0 * lower.diagonal().log().sum())
        self.gram += f.T @ f
        self.logdet += gain
        self._rank_since_inverse += len(f)
        self._factor = None
        if self._rank_since_inverse >= self.pool.d:  # a fresh inverse, as Design does
            chol = torch.linalg.cholesky(self.gram)
            self.inverse = torch.cholesky_inverse(chol)
            self.logdet = float(2.0 * chol.diagonal().log().sum())
            self._rank_since_inverse = 0
        else:  # Woodbury: V'^{-1} = V^{-1} - W^T W, W = L^{-1} F V^{-1}, L L^T = I + F V^{-1} F^T
            w = torch.linalg.solve_triangular(lower, fv, upper=False)
            self.inverse -= w.T @ w
            self.inverse = (self.inverse + self.inverse.T) / 2
        return gain
