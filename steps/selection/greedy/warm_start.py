"""Warm starts: an earlier selection's design V0 = Σ FᵀF (design.npy) joins the objective.

select.prior (or `sift select --prior`) names the earlier selection; steps/selection/select.py
selects on log det(λI + V0 + V_S) and keeps the prior's examples out of the candidates.
fisher-label selects on the label-weighted counterpart instead, log det(λI + L0 + Σ label
Grams), L0 being the prior's label_design.npy (written beside design.npy by a selection on a
pool with label factors), and scores its picks on V0 like every selector.
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
    """An earlier selection to warm-start from: its selection.json and design.npy on disk,
    and its label_design.npy when it wrote one.

    The md5s make the prior's content part of any cache key built from this value.
    """

    source: str  # the MLflow run id it came from, or the file it was read from
    setting: str  # what named it (select.prior, --prior): errors name it back
    selection_path: str
    design_path: str
    design_md5: str
    label_design_path: str | None = None  # None: the selection wrote no label design
    label_design_md5: str | None = None


def load_prior(selection_path: Path, source: str, setting: str) -> PriorRef:
    """An earlier selection.json and the design.npy (and label_design.npy, when the record
    names one) beside it, checked to belong together.

    source: the run id or file it came from; setting: the knob that named it, for errors.
    """
    named = f"{setting}={source!r}"
    record = read_selection(selection_path, named)
    design_path = selection_path.parent / "design.npy"
    design_md5 = _checked_md5(design_path, record.design_md5, named, selection_path)
    if record.label_design_md5 is None:
        # a label_design.npy beside it is another selection's: this one wrote none
        return PriorRef(source, setting, str(selection_path), str(design_path), design_md5)
    label_path = selection_path.parent / "label_design.npy"
    label_md5 = _checked_md5(label_path, record.label_design_md5, named, selection_path)
    return PriorRef(
        source,
        setting,
        str(selection_path),
        str(design_path),
        design_md5,
        str(label_path),
        label_md5,
    )


def _checked_md5(path: Path, recorded: str, named: str, selection_path: Path) -> str:
    """path's md5, a ValueError starting with `named` when it is missing or not `recorded`."""
    if not path.is_file():
        raise ValueError(f"{named}: no {path.name} beside {selection_path}")
    md5 = file_md5(path)
    if md5 != recorded:
        raise ValueError(
            f"{named}: {path} (md5 {md5}) is not the design this selection "
            f"wrote (md5 {recorded}); was it overwritten by another selection?"
        )
    return md5


@dataclass(frozen=True)
class WarmStart:
    design: np.ndarray  # V0 (d, d) float64; zeros without a prior
    # L0 (d, d) float64, the label-weighted V0; zeros without a prior, None when the prior
    # has no label design
    label_design: np.ndarray | None
    train_ids: list[str]  # the prior's train ids found in this pool, in its order
    rows: np.ndarray  # their positions in the pool
    summary: PriorSummary | None  # selection.json's "prior"


def warm_start(
    prior: PriorRef | None, space: str, ids: list[str], pool: FeaturePool, ridge: float
) -> WarmStart:
    if prior is None:
        zeros = np.zeros((pool.d, pool.d))
        return WarmStart(zeros, zeros.copy(), [], np.empty(0, np.int64), None)
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
    design = _load_design(prior.design_path, named, pool.d)
    label_design = None
    if prior.label_design_path is not None:
        label_design = _load_design(prior.label_design_path, named, pool.d)
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
    return WarmStart(design, label_design, in_pool, rows, summary)


def _load_design(path: str, named: str, d: int) -> np.ndarray:
    design = np.load(path).astype(np.float64)
    if design.shape != (d, d):
        raise ValueError(
            f"{named}: {Path(path).name} has shape {design.shape}; this pool's statistics are "
            f"{d} wide, so it must be ({d}, {d})"
        )
    return design


def label_prior_for(selector: str, prior: PriorRef | None, start: WarmStart) -> np.ndarray | None:
    """What `selector` selects against besides the plain prior: fisher-label's L0 (None for
    the other selectors and cold starts); a ValueError naming the prior's setting when
    fisher-label warm-starts from a prior that has no label design."""
    if selector != "fisher-label" or prior is None:
        return None
    if start.label_design is None:
        raise ValueError(
            f"{prior.setting}={prior.source!r}: select.selector=fisher-label warm-starts from "
            "the prior's label-weighted design, but that selection has no label_design.npy "
            "(its run embedded without embed.token_weight=label, or warm-started from a prior "
            "without one): use select.selector=fisher for this warm start, or re-run the prior "
            "with embed.token_weight=label"
        )
    return start.label_design


def save_label_design(
    out_dir: Path, pool: FeaturePool, order: np.ndarray, start: WarmStart
) -> Path | None:
    """out_dir/label_design.npy, the next fisher-label warm start's L0: the prior's label
    design + the picks' label-weighted Gram, written whatever the selector (the next run may
    use fisher-label). None without label factors, or when the prior has no label design
    (the picks' Gram alone would leave out what the prior trained on)."""
    path = out_dir / "label_design.npy"
    if pool.label_factors is None or start.label_design is None:
        path.unlink(missing_ok=True)  # an earlier selection's here would not be this one's
        return None
    # design_of(pool.label_weighted(), order) without re-checking every row of the pool
    label = pool.label_factors[pool.factor_rows(order)].astype(np.float64)
    np.save(path, start.label_design + label.T @ label)
    return path
