"""Warm starts: an earlier selection's design V0 = Σ FᵀF (design.npy) joins the objective.

select.prior (or `sift select --prior`) names the earlier selection; steps/selection/select.py
selects on log det(λI + V0 + V_S) and keeps the prior's examples out of the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steps.hashing import file_md5
from steps.selection.pool import FeaturePool
from steps.selection.record import PriorSummary, read_selection


@dataclass(frozen=True)
class PriorRef:
    """An earlier selection to warm-start from: its selection.json and design.npy on disk.

    design_md5 makes the prior's content part of any cache key built from this value.
    """

    source: str  # the MLflow run id it came from, or the file it was read from
    setting: str  # what named it (select.prior, --prior): errors name it back
    selection_path: str
    design_path: str
    design_md5: str


def load_prior(selection_path: Path, source: str, setting: str) -> PriorRef:
    """An earlier selection.json and the design.npy beside it, checked to belong together.

    source: the run id or file it came from; setting: the knob that named it, for errors.
    """
    named = f"{setting}={source!r}"
    record = read_selection(selection_path, named)
    design_path = selection_path.parent / "design.npy"
    if not design_path.is_file():
        raise ValueError(f"{named}: no design.npy beside {selection_path}")
    design_md5 = file_md5(design_path)
    if design_md5 != record.design_md5:
        raise ValueError(
            f"{named}: {design_path} (md5 {design_md5}) is not the design this selection "
            f"wrote (md5 {record.design_md5}); was it overwritten by another selection?"
        )
    return PriorRef(source, setting, str(selection_path), str(design_path), design_md5)


@dataclass(frozen=True)
class WarmStart:
    design: np.ndarray  # V0 (d, d) float64; zeros without a prior
    train_ids: list[str]  # the prior's train ids found in this pool, in its order
    rows: np.ndarray  # their positions in the pool
    summary: PriorSummary | None  # selection.json's "prior"


def warm_start(
    prior: PriorRef | None, space: str, ids: list[str], pool: FeaturePool, ridge: float
) -> WarmStart:
    if prior is None:
        return WarmStart(np.zeros((pool.d, pool.d)), [], np.empty(0, np.int64), None)
    named = f"{prior.setting}={prior.source!r}"
    record = read_selection(Path(prior.selection_path), named)
    if not space:
        raise ValueError(f"{named}: a warm start needs this pool's feature space to check")
    if record.feature_space != space:
        raise ValueError(
            f"{named} was selected in feature space {record.feature_space!r} but this pool's "
            f"is {space!r} (another model, statistics width or sketch seed): its design "
            "cannot be added to these statistics"
        )
    design = np.load(prior.design_path).astype(np.float64)
    if design.shape != (pool.d, pool.d):
        raise ValueError(
            f"{named}: design.npy has shape {design.shape}; this pool's statistics are "
            f"{pool.d} wide, so it must be ({pool.d}, {pool.d})"
        )
    row_of = {example_id: row for row, example_id in enumerate(ids)}
    in_pool = [i for i in record.train_ids if i in row_of]
    _, objective = np.linalg.slogdet(ridge * np.eye(pool.d) + design)
    summary = PriorSummary(
        source=prior.source,
        examples=len(record.train_ids),
        in_pool=len(in_pool),
        objective=float(objective),
    )
    rows = np.array([row_of[i] for i in in_pool], dtype=np.int64)
    return WarmStart(design, in_pool, rows, summary)
