"""The constants that trade memory and batching against speed in a greedy FisherSFT selection.

Under any of them lazy greedy picks what plain greedy picks (tests/unit/test_selectors.py and
test_torch_backend.py set each to its extreme); `Design` (design.py) and `TorchDesign`
(torch_design.py) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class GreedySettings:
    """How the fisher selectors batch, cache and bound their work, not what they pick.

    Lazy greedy under any settings picks what plain greedy picks (tests/unit/test_selectors.py
    sets every knob to its extreme); gram_min_rank alone changes how a gain is computed, and
    so its last bits. A screen_safety far below 1 could leave a float32 error outside its
    margin: lazy greedy stops with an error when a float64 check finds one. The defaults
    are measured trade-offs, noted beside each field.
    """

    # Factor rows per batched gain evaluation: ~100 MB of temporaries at d=768.
    chunk_rows: int = 8192
    # Stale heap entries re-evaluated at once: 8-32 measured equal, 1 is 1.6x slower.
    lazy_batch: int = 16
    # Stale entries whose trace bound is computed at once (d^2 flops each).
    bound_batch: int = 32
    # Examples with r >= this * d get their gain from a d x d Cholesky.
    gram_min_rank: float = 0.5
    # Packed float64 Grams of high-rank examples are kept if they fit in this.
    gram_cache_bytes: int = 2 * 2**30
    # Relative (and absolute) inflation of the cheap bound on a gain.
    bound_slack: float = 1e-6
    # Largest factor rows per example in the exact (Fischer) head of a bound.
    head_rows: int = 8
    # Widest d whose lazy batches grow within a step (see greedy._best_score).
    grow_max_d: int = 128
    # Highest bounds a lazy step scans; the rest only at a rebuild.
    top_segment: int = 2048
    # Examples per call from which gains and bounds are split across threads.
    parallel_min: int = 256
    # ... or from this many flops (factor rows x d^2): a lazy batch of 16 examples at d=768
    # is ~1.5e9, and split over 2 threads it ran 1.8x faster.
    parallel_min_flops: int = 2**28
    # Float64 head rows kept; fewer rows per example when N d is large.
    head_cache_bytes: int = 2**30
    # Narrowest d whose low-rank gains are screened in float32 first (screen.py): at d=768 a
    # screen costs 1/4-1/5 of a float64 gain; at d=64 per-call overhead dominates both.
    screen_min_d: int = 256
    # Multiple of the modelled float32 error that a screened gain's margin spans (screen.py):
    # 8 is ~2,800x the largest error measured; wider only costs float64 checks near the top.
    screen_safety: float = 8.0
    # Torch backend: device memory (MiB) for resident factors and batch temporaries.
    device_memory_mb: int = 4096

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # field.type is the annotation's text under `from __future__ import annotations`
            whole = field.type in ("int", int)
            number, kind = (int, "an integer") if whole else ((int, float), "a number")
            least = 0 if not whole or field.name.endswith("_bytes") else 1
            if isinstance(value, bool) or not isinstance(value, number) or not value >= least:
                raise ValueError(
                    f"GreedySettings.{field.name} must be {kind} >= {least}, got {value!r}"
                )
            if not np.isfinite(value):
                raise ValueError(f"GreedySettings.{field.name} must be finite, got {value!r}")
