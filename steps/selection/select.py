"""Selection step: pick a training subset from the pool's statistics and record why.

The math is in steps/selection/selectors.py; this wraps it with budgets, ids and files, and
with warm starts: an earlier selection's design V0 = Σ FᵀF (design.npy, written by every selection)
joins the objective, log det(λI + V0 + V_S), so the new picks add what it lacks. A selection
on a pool with label factors also writes label_design.npy, the label-weighted L0 that
fisher-label's warm start selects against (steps/selection/greedy/warm_start.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from steps.data.ingest import IngestConfig, named_source_batches, stream_table
from steps.encoding import chat_encoding
from steps.hashing import file_md5
from steps.modeling import ModelConfig, ModelSource
from steps.selection.embedding.embed import (
    EmbedConfig,
    FeaturesRef,
    embed_pool,
    feature_space,
    load_pool,
)
from steps.selection.greedy.settings import GreedySettings
from steps.selection.greedy.warm_start import (  # PriorRef, load_prior: callers import them here
    PriorRef as PriorRef,
    WarmStart,
    label_prior_for,
    load_prior as load_prior,
    save_label_design,
    warm_start,
)
from steps.selection.record import SelectionRecord, read_selection, write_selection
from steps.selection.select_config import SelectConfig
from steps.selection.selectors import design_of, select
from steps.selection.target_sample import (
    embed_targets,
    read_target_prompts,
    target_states_for,
)

# Selectors that read statistics the embed pass makes only when asked: selector -> (the
# EmbedConfig field, the value that makes them).
EMBED_NEEDS: dict[str, tuple[str, str]] = {"fisher-label": ("token_weight", "label")}


def check_embed_for(config: SelectConfig, embed: EmbedConfig) -> None:
    """ValueError naming both keys when config.selector reads what `embed` does not compute.

    Not a setting made for the user: embed's own section stays the one place that says what
    the embed pass computes (and keys its cache); a selector never re-embeds behind it.
    """
    if config.selector not in EMBED_NEEDS:
        return
    field, value = EMBED_NEEDS[config.selector]
    if getattr(embed, field) != value:
        raise ValueError(
            f"select.selector={config.selector} reads statistics that embed.{field}="
            f"{getattr(embed, field)} does not compute: set embed.{field}={value}"
        )


@dataclass(frozen=True)
class SelectionRef:
    """The chosen ids (in pick order) with gains and the objective curve, on disk."""

    selection_path: str
    plot_path: str
    selector: str
    examples: int  # new picks
    loss_tokens: int  # of the new picks
    objective: float  # log det(λI + prior + V_S) after the last pick
    design_path: str  # prior + Σ FᵀF of the new picks (float64, no ridge)
    train_examples: int  # what fine-tuning trains on: the prior's examples in this pool + picks
    budget_kind: str = "examples"  # what the budget counted: "examples" or "tokens"
    # the prior's label design + the new picks' label-weighted Gram; None when none was
    # written (a pool without label factors, or a prior without a label design)
    label_design_path: str | None = None


def resolve_budget(
    budget: float, total: int, field: str = "select.budget", unit: str = "examples"
) -> int:
    """A fraction of the total (0 < b < 1) or a whole count (b >= 1, at most the total)."""
    count = round(budget * total) if budget < 1 else int(budget)
    if budget >= 1 and budget != int(budget):
        raise ValueError(f"{field}={budget:g}: a count must be whole (or use a fraction below 1)")
    if not 1 <= count <= total:
        raise ValueError(
            f"{field}={budget:g} gives {count} of the pool's {total} {unit}; need 1..{total}"
        )
    return count


def resolve_backend(backend: str, device: str) -> str:
    """select.backend against the run's resolved device: auto is torch on CUDA, else numpy."""
    if backend == "auto":
        return "torch" if torch.device(device).type == "cuda" else "numpy"
    return backend


def select_subset(
    features: FeaturesRef,
    train_path: str,
    config: SelectConfig,
    out_dir: Path,
    *,
    space: str = "",
    prior: PriorRef | None = None,
    device: str = "cpu",
    target: FeaturesRef | None = None,
) -> SelectionRef:
    """Pick config.budget new examples (or config.budget_tokens loss tokens of new
    examples), warm-started from `prior` when one is given.

    space: embedding.embed.feature_space of `features`, recorded in selection.json; a prior
    must have been selected in the same space. The prior's examples found in this pool
    (by id) are not candidates; train_ids lists them, in the prior's order, then the new
    picks. device: the run's resolved device (model.device), where select.backend=torch (or
    auto, on CUDA) computes. target: select.target's states (embed_targets, same model and
    embed settings as `features`), which fisher-target needs. Writes out_dir/selection.json,
    design.npy (prior + Σ FᵀF of the new picks), label_design.npy (its label-weighted
    counterpart, when the pool has label factors and the prior, if any, a label design) and
    the curve plot.
    """
    pool = load_pool(features)
    target_states = target_states_for(config.selector, config.target, target, pool)
    ids = pd.read_parquet(train_path, columns=["id"]).id.to_numpy()
    if len(ids) != pool.N:
        raise ValueError(f"{train_path} has {len(ids)} rows but the features hold {pool.N}")
    start = warm_start(prior, space, [str(i) for i in ids], pool, config.ridge)
    label_prior = label_prior_for(config.selector, prior, start)  # before any pick
    keep = np.setdiff1d(np.arange(pool.N), start.rows)  # the candidates, ascending
    tokens = config.counts_tokens
    total = int(pool.n_tokens[keep].sum()) if tokens else len(keep)
    budget = _new_budget(config, total, "loss tokens" if tokens else "examples", prior, start)
    candidates = pool if len(keep) == pool.N else pool.subset(keep)
    chosen = select(
        candidates,
        budget,
        config.selector,
        ridge=config.ridge,
        seed=config.seed,
        prior=start.design if prior is not None else None,
        progress=True,
        settings=GreedySettings(device_memory_mb=config.device_memory_mb),
        backend=resolve_backend(config.backend, device),
        device=device,
        token_budget=tokens,
        target=target_states,
        label_prior=label_prior,
    )
    order = keep[chosen.order]  # candidate positions → pool rows
    new_ids = [str(ids[i]) for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    design_path = out_dir / "design.npy"
    np.save(design_path, start.design + design_of(pool, order))  # the next warm start's V0
    label_design_path = save_label_design(out_dir, pool, order, start)
    record = SelectionRecord(
        selector=config.selector,
        budget=budget,
        ridge=config.ridge,
        feature_space=space,
        ids=new_ids,
        rows=[int(i) for i in order],
        train_ids=start.train_ids + new_ids,
        prior=start.summary,
        gains=chosen.gains.tolist(),
        objective=chosen.objective.tolist(),
        final_objective=float(chosen.objective[-1]),
        loss_tokens=int(pool.n_tokens[order].sum()),
        design_md5=file_md5(design_path),  # ties design.npy to this file (see load_prior)
        budget_kind="tokens" if tokens else "examples",
        label_design_md5=None if label_design_path is None else file_md5(label_design_path),
    )
    selection_path = out_dir / "selection.json"
    write_selection(selection_path, record)
    plot_path = out_dir / "objective_curve.png"
    _plot_objective(chosen.objective, config.selector, plot_path, chosen.leverage)
    return SelectionRef(
        selection_path=str(selection_path),
        plot_path=str(plot_path),
        selector=config.selector,
        examples=len(order),
        loss_tokens=record.loss_tokens,
        objective=record.final_objective,
        design_path=str(design_path),
        train_examples=len(record.train_ids),
        budget_kind=record.budget_kind,
        label_design_path=None if label_design_path is None else str(label_design_path),
    )


def selected_ids(selection: SelectionRef) -> list[str]:
    """What fine-tuning trains on: the prior's examples in the pool, then the new picks."""
    return read_selection(Path(selection.selection_path), "selection").train_ids


def _new_budget(
    config: SelectConfig, total: int, unit: str, prior: PriorRef | None, start: WarmStart
) -> int:
    """resolve_budget over the candidates; when the prior's exclusions leave too few, say so."""
    field, value = config.budget_setting
    if prior is not None and len(start.rows) and (total == 0 or value > total):
        raise ValueError(
            f"{field}={value:g} asks for more new picks than the {total} "
            f"candidate {unit} left: {prior.setting}={prior.source!r} already trained on "
            f"{len(start.rows)} of this pool's examples, which are not picked again"
        )
    return resolve_budget(value, total, field, unit)


def _plot_objective(
    objective: np.ndarray, selector: str, path: Path, leverage: np.ndarray | None = None
) -> None:
    """The log det curve; fisher-target's adds the target's mean leverage beside it."""
    figure = Figure(figsize=(6 if leverage is None else 11, 3.5))
    axes = figure.subplots(1, 1 if leverage is None else 2, squeeze=False)[0]
    axes[0].plot(np.arange(1, len(objective) + 1), objective)
    axes[0].set_xlabel("examples selected")
    axes[0].set_ylabel("log det(λI + V_S)")
    axes[0].set_title(f"Selection objective ({selector})")
    if leverage is not None:
        axes[1].semilogy(np.arange(len(leverage)), leverage)
        axes[1].set_xlabel("examples selected")
        axes[1].set_ylabel("mean target leverage")
        axes[1].set_title("Target leverage (select.target)")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def select_from_file(
    data: IngestConfig,
    model: ModelSource,
    embed: EmbedConfig,
    config: SelectConfig,
    work_dir: Path,
    *,
    device: str,
    precision: str,
    project_dir: Path,
    prior: PriorRef | None = None,
) -> SelectionRef:
    """Selection without the pipeline: data.source → ingest's field mapping → embed with
    `model` → pick with `config`, warm-started from `prior` when given (an earlier selection
    over the same model's statistics). `model`: steps/modeling.py model_source, whose
    fingerprint names the feature space as the pipeline's does (a GGUF's md5, not its
    converted folder's), so a pipeline run's selection warm-starts this one.

    The sections are the pipeline's own (flows/config.py PipelineConfig), so a file maps
    and embeds as `sift run` would: data.prompt_field/response_field templates, text_field,
    chat_template and limit. Writes work_dir/selection.json (steps/selection/record.py) and
    design.npy (and label_design.npy, see select_subset) beside it.
    """
    table_path, features = embed_file(
        data,
        model.config,
        embed,
        work_dir,
        device=device,
        precision=precision,
        project_dir=project_dir,
    )
    space = feature_space(features, model.fingerprint, embed)
    target = None
    if config.target:
        prompts = read_target_prompts(data, config.target, project_dir)
        target_dir = work_dir / "target_features"
        target = embed_targets(prompts, model.config, embed, target_dir, device, precision)
    return select_subset(
        features,
        str(table_path),
        config,
        work_dir,
        space=space,
        prior=prior,
        device=device,
        target=target,
    )


def embed_file(
    data: IngestConfig,
    model: ModelConfig,
    embed: EmbedConfig,
    work_dir: Path,
    *,
    device: str,
    precision: str,
    project_dir: Path,
) -> tuple[Path, FeaturesRef]:
    """data.source mapped as ingest maps it into work_dir/pool.parquet, and its statistics
    (work_dir/features): the pool `sift select` and `sift advise` pick from."""
    work_dir.mkdir(parents=True, exist_ok=True)
    table_path = work_dir / "pool.parquet"
    stream_table(
        named_source_batches(data, project_dir), data, data.source, "train", data.limit, table_path
    )
    chat = chat_encoding([table_path], data, model, project_dir)  # None: prompt/response rows
    features = embed_pool(str(table_path), model, embed, work_dir / "features", device,
                          precision, chat)  # fmt: skip
    return table_path, features

