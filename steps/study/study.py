"""The data-efficiency study's pure logic: its config, arms, each trial's select and
finetune sections, and what each selection picked. No Prefect, no MLflow; its statistics,
tables and plots are in steps/study/report.py.

flows/study.py runs selectors × budgets × seeds through the pipeline's own steps and
hands the per-trial records to the functions here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from steps import config_files
from steps.data.ingest import IngestConfig, write_table
from steps.data.validate import ValidateConfig
from steps.evaluation.evaluate import EvalConfig
from steps.modeling import ModelConfig
from steps.selection.embedding.embed import FILES, LABEL_FILES, EmbedConfig, FeaturesRef
from steps.selection.pool import FeaturePool
from steps.selection.record import read_selection
from steps.selection.select import EMBED_NEEDS, SelectConfig
from steps.selection.selectors import DEFAULT_RIDGE, SELECTORS
from steps.study.synthetic import SyntheticConfig
from steps.tracking import TrackingConfig
from steps.training.finetune import FinetuneConfig

BASELINE = "uniform"  # paired differences are taken against this arm
BudgetKind = Literal["examples", "tokens"]


@dataclass(frozen=True)
class Arm:
    """One compared selection method: a registry selector, its ridge λ, and whether each
    example's Gram is divided by its token count (`:mean`, no preference for length)."""

    label: str
    selector: str
    ridge: float
    length_normalised: bool


def parse_arm(spec: str, default_ridge: float) -> Arm:
    """'fisher', 'fisher:ridge=10', 'fisher:mean' or 'fisher:mean,ridge=10' -> Arm."""
    selector, _, options = spec.partition(":")
    if selector not in SELECTORS:
        raise ValueError(f"study.arms: {spec!r} names no selector; known: {', '.join(SELECTORS)}")
    ridge, mean = default_ridge, False
    for option in filter(None, options.split(",")):
        name, _, value = option.partition("=")
        if name == "mean" and not value:
            mean = True
        elif name == "ridge" and value:
            ridge = float(value)
            if not ridge > 0:
                raise ValueError(f"study.arms: {spec!r}: ridge must be positive")
        else:
            raise ValueError(f"study.arms: {spec!r}: unknown option {option!r} (mean, ridge=λ)")
    return Arm(spec, selector, ridge, mean)


class StudySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arms: list[str] = Field(
        default_factory=lambda: ["fisher", "fisher-pooled", "fisher-per-token", "uniform"],
        description='Selection methods compared: registry names, optionally with options '
        '("fisher:mean,ridge=10"); an empty list runs the synthetic part only.',
    )
    budgets: list[float] = Field(
        default_factory=lambda: [0.01, 0.05, 0.1, 0.2],
        description="Fractions of the pool (< 1) or counts; of loss tokens for fisher-per-token "
        'and under budget kind "tokens".',
    )
    # "tokens" sets select.budget_tokens for every arm and finetune.steps = the optimiser steps
    # uniform's equal-examples run at that fraction takes (equal_steps), so few long examples
    # and many short ones get equal tokens and equal steps.
    budget_kinds: list[BudgetKind] = Field(
        default=["examples"],  # pydantic copies a mutable default
        description="What each budget holds equal across arms: examples (long-example pickers "
        "then train on more tokens) or tokens (equal loss tokens and steps); each costs trials.",
    )
    # The training-order seed (finetune.seed) is the trial's seed for every arm: common random
    # numbers, so a paired difference at one seed measures the selection, not the shuffle
    # (training order moves eval loss about as much as uniform's subset draw).
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        description="Seeds per arm and budget: each varies the selection (uniform, k-center) "
        "and the training order, shared by all arms.",
    )
    ridge: float = Field(
        default=DEFAULT_RIDGE, gt=0, description="Ridge λ for arms that set none."
    )
    holdout: int = Field(
        default=0,
        ge=0,
        description="> 0: the pool's last `holdout` rows become the eval split, never selected: "
        "tune here, never on data.eval_source.",
    )
    confidence: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="Level of the t-intervals over seeds and of the paired differences vs "
        "uniform.",
    )
    results_dir: str | None = Field(
        default=None,
        description="Where the table, CSV and plots are also written (project-relative); null: "
        "only MLflow and .sift/studies/.",
    )
    name: str = Field(
        default="study",
        description="Names the study's MLflow run and its folder under .sift/studies/.",
    )

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        for spec in arms:
            if parse_arm(spec, DEFAULT_RIDGE).selector == "fisher-target":
                raise ValueError(
                    f"study.arms: {spec!r} reads select.target, a sample of prompts the study "
                    "does not embed; run fisher-target with `sift select` (select.target=FILE)"
                )
        if len(set(arms)) != len(arms):
            raise ValueError("study.arms lists an arm twice")
        return arms

    @field_validator("budget_kinds")
    @classmethod
    def _distinct_kinds(cls, kinds: list[str]) -> list[str]:
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"study.budget_kinds={kinds}: list examples, tokens or both, once")
        return kinds


class StudyConfig(BaseModel):
    """`sift study`'s one config: a section per step, defaults here, YAML only overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: IngestConfig = Field(
        default_factory=lambda: IngestConfig(limit=2000, eval_limit=400),
        description="Ingest, as in the pipeline; a 2,000-row pool by default.",
    )
    validation: ValidateConfig = Field(
        default_factory=ValidateConfig, description="The pipeline's validation gate."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    embed: EmbedConfig = Field(
        default_factory=EmbedConfig, description="The embedding pass every arm reads."
    )
    # One epoch keeps the study's 48 trials inside ~30 min on 2 CPU cores.
    finetune: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(epochs=1.0),
        description="Each trial's fine-tune; one epoch by default.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Each trial's evaluation.")
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="sift-study"),
        description="Where MLflow records the study; experiment sift-study by default.",
    )
    study: StudySection = Field(
        default_factory=StudySection,
        description="Arms × budgets × seeds on real data, and how the results are summarised.",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig,
        description="The FisherSFT paper's synthetic experiment (runs = 0 skips it).",
    )

    def arms(self) -> list[Arm]:
        return [parse_arm(spec, self.study.ridge) for spec in self.study.arms]

    @model_validator(mode="after")
    def _sections_fit_the_arms(self) -> StudyConfig:
        # At load, not at the trial that needs it (after the embed pass and earlier trials).
        # A custom error: no "Value error, " before a message that names its keys.
        if problem := self._mismatch():
            raise PydanticCustomError("study_sections", "{problem}", {"problem": problem})
        return self

    def _mismatch(self) -> str | None:
        for arm in self.arms():
            if arm.selector in EMBED_NEEDS:
                field, value = EMBED_NEEDS[arm.selector]
                if getattr(self.embed, field) != value:
                    return (
                        f"study.arms: {arm.label} reads statistics that embed.{field}="
                        f"{getattr(self.embed, field)} does not compute: set embed.{field}: {value}"
                    )
        finetune, why = self.finetune, "study.budget_kinds 'tokens' trains one pass in equal steps"
        if "tokens" not in self.study.budget_kinds:
            return None
        if finetune.steps is not None:
            return (
                f"finetune.steps={finetune.steps}: study.budget_kinds 'tokens' sets each "
                "trial's steps (uniform's at equal examples); leave finetune.steps unset"
            )
        if finetune.epochs != 1:
            return f"{why}: set finetune.epochs=1 (got {finetune.epochs:g})"
        if finetune.num_processes != 1:
            return (
                f"{why} in one process: set finetune.num_processes=1 (got {finetune.num_processes})"
            )
        return None


class StudyConfigError(ValueError):
    pass


def load_study_config(
    path: Path | None, overrides: list[tuple[str, Any]], project_dir: Path | None = None
) -> StudyConfig:
    """Defaults, then the YAML file, then (dotted key, value) overrides; errors name the key.
    The file is read as flows/config.py load_config reads one (project_dir: where a symlink
    named inside may lead; the working directory when None)."""
    return config_files.load_model(
        StudyConfig, path, overrides, StudyConfigError, "study config", project_dir
    )


def split_holdout(train_path: str, rows: int, out_dir: Path) -> tuple[str, str]:
    """The pool without its last `rows` rows, and those rows as a tuning eval split."""
    frame = pd.read_parquet(train_path)
    if not 0 < rows < len(frame):
        raise ValueError(f"study.holdout={rows} must leave a pool: the data has {len(frame)} rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    pool_path, holdout_path = out_dir / "pool.parquet", out_dir / "holdout.parquet"
    write_table(frame.iloc[:-rows].reset_index(drop=True), pool_path)
    write_table(frame.iloc[-rows:].reset_index(drop=True), holdout_path)
    return str(pool_path), str(holdout_path)


def trial_configs(
    config: StudyConfig, arm: Arm, kind: str, budget: float, seed: int, pool: FeaturesRef
) -> tuple[SelectConfig, FinetuneConfig]:
    """What one trial selects and trains with. finetune.seed is the trial's seed whatever the
    arm (common random numbers, see StudySection.seeds); under kind "tokens" the budget is
    select.budget_tokens and finetune.steps is equal_steps of the pool (its size and tokens)."""
    if kind == "examples":
        select = SelectConfig(selector=arm.selector, budget=budget, ridge=arm.ridge, seed=seed)
        return select, config.finetune.model_copy(update={"seed": seed})
    select = SelectConfig(selector=arm.selector, budget_tokens=budget, ridge=arm.ridge, seed=seed)
    steps = equal_steps(budget, pool.examples, pool.loss_tokens, config.finetune)
    return select, config.finetune.model_copy(update={"seed": seed, "steps": steps})


def equal_steps(budget: float, examples: int, tokens: int, finetune: FinetuneConfig) -> int:
    """The optimiser steps of every arm at a token budget: those uniform's equal-examples run
    at the same fraction of the pool takes, ceil(ceil(k / batch_size) / accumulation).

    k = round(budget x examples) for a fraction (as select's resolve_budget), and for a count of
    tokens the examples of the pool's mean length that hold it, round(budget x examples / tokens).
    """
    fraction = budget if budget < 1 else budget / tokens
    k = max(1, round(fraction * examples))
    return math.ceil(math.ceil(k / finetune.batch_size) / finetune.gradient_accumulation_steps)


def length_normalised(features: FeaturesRef, out_dir: Path) -> FeaturesRef:
    """The same statistics with every F_i divided by sqrt(T_i): each example contributes its
    mean token Gram (1/T_i) Σ_j x_ij x_ijᵀ, so a long example is worth no more than a short
    one with the same states. Written as a features folder that select_subset reads; the
    label-weighted factors (embed.token_weight=label), when there, are scaled alike."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(features.features_dir)
    names = FILES + tuple(n for n in LABEL_FILES if (source / f"{n}.npy").exists())
    arrays = {name: np.load(source / f"{name}.npy") for name in names}
    ranks = np.diff(arrays["offsets"])
    per_row = np.repeat(1.0 / np.sqrt(arrays["n_tokens"].astype(np.float64)), ranks)
    for name in ("factors", *LABEL_FILES):  # row for row: the same offsets serve both
        if name in arrays:
            arrays[name] = (arrays[name] * per_row[:, None]).astype(np.float32)
    for name, array in arrays.items():
        np.save(out_dir / f"{name}.npy", array)
    return replace(features, features_dir=str(out_dir))


def _per_example(pool: FeaturePool, per_row: np.ndarray) -> np.ndarray:
    """Sum a per-factor-row quantity over each example's rows."""
    return np.add.reduceat(per_row, pool.offsets[:-1])


def _rows_of(pool: FeaturePool, order: np.ndarray) -> np.ndarray:
    return np.concatenate([pool.factors[pool.offsets[i] : pool.offsets[i + 1]] for i in order])


def picked_rows(selection_path: str) -> np.ndarray:
    """Pool positions of a selection (select_subset's selection.json), in pick order."""
    return np.asarray(read_selection(Path(selection_path), "study").rows, dtype=np.int64)


def selection_profile(
    pool: FeaturePool, order: np.ndarray, heldout: FeaturePool, ridge: float
) -> dict[str, float]:
    """What a selection picked, next to the pool, and how well it covers held-out states.

    leverage = x V_S⁻¹ x averaged over an example's tokens, V_S = λI + Σ_{i∈S} F_iᵀF_i: the
    quantity the paper's prediction-error bound is built from (mean over held-out tokens,
    and the worst held-out example). outlier = Mahalanobis distance of an example's mean
    state from the pool's, in units of the pool's spread.
    """
    picked = _rows_of(pool, order).astype(np.float64)
    inverse = np.linalg.inv(ridge * np.eye(pool.d) + picked.T @ picked)
    held = heldout.factors.astype(np.float64)
    quadratic = np.einsum("rd,de,re->r", held, inverse, held)  # tr(V⁻¹ FᵀF) = Σ_rows f V⁻¹ f
    per_example = _per_example(heldout, quadratic) / heldout.n_tokens
    pooled = pool.pooled.astype(np.float64)
    centred = pooled - pooled.mean(axis=0)
    precision = np.linalg.pinv(np.cov(centred, rowvar=False))
    outlier = np.sqrt(np.einsum("nd,de,ne->n", centred, precision, centred))
    squares = np.einsum("rd,rd->r", pool.factors, pool.factors).astype(np.float64)
    norms = np.sqrt(_per_example(pool, squares) / pool.n_tokens)  # RMS token-state norm
    base = pool.base_loss if pool.base_loss is not None else np.full(pool.N, np.nan)
    return {
        "tokens_per_example": float(pool.n_tokens[order].mean()),
        "pool_tokens_per_example": float(pool.n_tokens.mean()),
        "state_norm": float(norms[order].mean()),
        "pool_state_norm": float(norms.mean()),
        "base_loss": float(base[order].mean()),
        "pool_base_loss": float(base.mean()),
        "outlier": float(outlier[order].mean()),
        "pool_outlier": float(outlier.mean()),
        "heldout_leverage_mean": float((per_example * heldout.n_tokens).sum())
        / float(heldout.n_tokens.sum()),
        "heldout_leverage_max": float(per_example.max()),
    }
