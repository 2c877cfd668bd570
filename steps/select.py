"""Selection step: pick a training subset from the pool's statistics and record why.

The math is in steps/selectors.py; this wraps it with budgets, ids and files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from pydantic import BaseModel, ConfigDict, Field

from steps.embed import EmbedConfig, FeaturesRef, embed_pool, load_pool
from steps.ingest import IngestConfig, normalise, read_source, write_table
from steps.modeling import ModelConfig
from steps.selectors import DEFAULT_RIDGE, SELECTORS, select


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # One of steps.selectors.SELECTORS: fisher, fisher-pooled, fisher-per-token, uniform, ...
    selector: str = "fisher"
    # A count of examples (>= 1), or a fraction of the pool (0 < budget < 1).
    # For fisher-per-token the count/fraction is of loss tokens, not examples.
    budget: float = Field(default=0.1, gt=0)
    # Ridge λ in log det(λI + V_S): keeps the objective finite before d tokens are chosen;
    # small against hidden-state norms so it barely moves the picks once V_S is full rank.
    ridge: float = Field(default=DEFAULT_RIDGE, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class SelectionRef:
    """The chosen ids (in pick order) with gains and the objective curve, on disk."""

    selection_path: str
    plot_path: str
    selector: str
    examples: int
    loss_tokens: int
    objective: float


def resolve_budget(budget: float, total: int, field: str = "select.budget") -> int:
    """A fraction of the total (0 < b < 1) or a whole count (b >= 1, at most the total)."""
    count = round(budget * total) if budget < 1 else int(budget)
    if budget >= 1 and budget != int(budget):
        raise ValueError(f"{field}={budget}: a count must be whole (or use a fraction below 1)")
    if not 1 <= count <= total:
        raise ValueError(f"{field}={budget} gives {count} of a pool of {total}; need 1..{total}")
    return count


def select_subset(
    features: FeaturesRef, train_path: str, config: SelectConfig, out_dir: Path
) -> SelectionRef:
    if config.selector not in SELECTORS:
        raise ValueError(
            f"select.selector={config.selector!r} is unknown; choose one of {sorted(SELECTORS)}"
        )
    pool = load_pool(features)
    ids = pd.read_parquet(train_path, columns=["id"]).id.to_numpy()
    if len(ids) != pool.N:
        raise ValueError(f"{train_path} has {len(ids)} rows but the features hold {pool.N}")
    per_token = config.selector == "fisher-per-token"
    total = int(pool.n_tokens.sum()) if per_token else pool.N
    budget = resolve_budget(config.budget, total)
    chosen = select(
        pool, budget, config.selector, ridge=config.ridge, seed=config.seed, progress=True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "selector": config.selector,
        "budget": budget,
        "ridge": config.ridge,
        "ids": [str(ids[i]) for i in chosen.order],
        "rows": [int(i) for i in chosen.order],  # positions in the pool table (file order)
        "gains": chosen.gains.tolist(),
        "objective": chosen.objective.tolist(),
        "final_objective": float(chosen.objective[-1]),
        "loss_tokens": int(pool.n_tokens[chosen.order].sum()),
    }
    selection_path = out_dir / "selection.json"
    selection_path.write_text(json.dumps(record))
    plot_path = out_dir / "objective_curve.png"
    _plot_objective(chosen.objective, config.selector, plot_path)
    return SelectionRef(
        selection_path=str(selection_path),
        plot_path=str(plot_path),
        selector=config.selector,
        examples=len(chosen.order),
        loss_tokens=int(pool.n_tokens[chosen.order].sum()),
        objective=float(chosen.objective[-1]),
    )


def selected_ids(selection: SelectionRef) -> list[str]:
    return list(json.loads(Path(selection.selection_path).read_text())["ids"])


def _plot_objective(objective: np.ndarray, selector: str, path: Path) -> None:
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.plot(np.arange(1, len(objective) + 1), objective)
    axis.set_xlabel("examples selected")
    axis.set_ylabel("log det(λI + V_S)")
    axis.set_title(f"Selection objective ({selector})")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def select_from_file(
    data_path: str,
    model: ModelConfig,
    config: SelectConfig,
    work_dir: Path,
    device: str,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> SelectionRef:
    """Selection without the pipeline: a JSONL/JSON/CSV/Parquet/text file (prompt/response
    fields, or one `text` field) → embed with `model` → pick with `config`.

    Writes work_dir/selection.json: ids (content hashes) and rows (file order) in pick order,
    per-pick gains, the objective curve and final_objective = log det(λI + V_S).
    """
    fields = IngestConfig(
        source=data_path, prompt_field=prompt_field, response_field=response_field
    )
    frame = read_source(data_path, "train", None, Path.cwd())
    table = normalise(frame, fields, data_path, "train")
    work_dir.mkdir(parents=True, exist_ok=True)
    table_path = work_dir / "pool.parquet"
    write_table(table, table_path)
    features = embed_pool(str(table_path), model, EmbedConfig(), work_dir / "features", device)
    return select_subset(features, str(table_path), config, work_dir)
