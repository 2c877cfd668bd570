"""selection.json: what a selection picked and why, as one typed record written and read here.

Every selection (the pipeline's, the study's, `sift select`'s) writes one; fine-tuning reads
train_ids from it, the study reads rows, and a warm start reads feature_space, train_ids,
design_md5 and label_design_md5 (steps/selection/greedy/warm_start.py load_prior).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# Fields that selections gained with warm starts: a file without them is most likely one
# written before then, and the message says so instead of listing every field it lacks.
WARM_START_FIELDS = ("feature_space", "train_ids", "design_md5")


class PriorSummary(BaseModel):
    """The earlier selection a warm start began from (selection.json's "prior")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str  # the MLflow run id or file it came from
    examples: int  # its train_ids
    in_pool: int  # of those, found in this pool (by id)
    objective: float  # log det(λI + V0): where this selection's objective curve starts


class SelectionRecord(BaseModel):
    """selection.json. Field order is the file's key order: keep it (files stay byte-stable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str
    budget: int  # the resolved count of new picks, or of their loss tokens (budget_kind)
    ridge: float
    feature_space: str  # steps.selection.embedding.embed.feature_space: where the design lives
    ids: list[str]  # the new picks, in pick order
    rows: list[int]  # their positions in the pool table (file order)
    train_ids: list[str]  # what fine-tuning trains on: the prior's ids in this pool + ids
    prior: PriorSummary | None  # None for a cold start
    gains: list[float]  # per pick
    objective: list[float]  # after each pick, from f(prior) + the first gain
    final_objective: float
    loss_tokens: int  # of the new picks
    design_md5: str  # of the design.npy beside this file (see load_prior)
    budget_kind: Literal["examples", "tokens"] = "examples"  # what budget counted
    # Of the label_design.npy beside this file (fisher-label's warm start); None when none was
    # written: a pool without label factors, a prior without one, or a file from before.
    label_design_md5: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _budget_kind_of_older_files(cls, data: Any) -> Any:
        # Files from before select.budget_tokens lack the kind: only fisher-per-token's
        # budget counted tokens then.
        if isinstance(data, dict) and "budget_kind" not in data:
            kind = "tokens" if data.get("selector") == "fisher-per-token" else "examples"
            return {**data, "budget_kind": kind}
        return data


def write_selection(path: Path, record: SelectionRecord) -> None:
    # json.dumps with default separators: the bytes selections have always had.
    path.write_text(json.dumps(record.model_dump()))


def read_selection(path: Path, setting: str) -> SelectionRecord:
    """The record at `path`; a ValueError starting with `setting` when it is not one."""
    if not path.is_file():
        raise ValueError(f"{setting}: no selection file at {path}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{setting}: {path} is not a selection.json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{setting}: {path} is not a selection.json (not a JSON object)")
    missing = [name for name in WARM_START_FIELDS if name not in raw]
    if missing:
        raise ValueError(
            f"{setting}: {path} lacks {', '.join(missing)}: not a selection, or one written "
            "before selections recorded their design; select again"
        )
    try:
        return SelectionRecord.model_validate(raw)
    except ValidationError as invalid:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in invalid.errors()
        )
        raise ValueError(f"{setting}: {path} is not a valid selection.json: {problems}") from None
