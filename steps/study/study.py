"""The data-efficiency study's pure logic: its config, arms, confidence intervals,
aggregation, what each selection picked, tables and plots. No Prefect, no MLflow.

flows/study.py runs selectors × budgets × seeds through the pipeline's own steps and
hands the per-trial records to the functions here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats

from steps import config_files
from steps.data.ingest import IngestConfig, write_table
from steps.evaluation.evaluate import EvalConfig
from steps.modeling import ModelConfig
from steps.selection.embed import FILES, EmbedConfig, FeaturesRef
from steps.selection.pool import FeaturePool
from steps.selection.record import read_selection
from steps.selection.selectors import DEFAULT_RIDGE, SELECTORS
from steps.study.synthetic import SyntheticConfig
from steps.tracking import TrackingConfig
from steps.training.finetune import FinetuneConfig

BASELINE = "uniform"  # paired differences are taken against this arm


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

    # Selection methods: registry names, optionally with options (see parse_arm). An empty
    # list skips the real-data part (synthetic only).
    arms: list[str] = Field(
        default_factory=lambda: ["fisher", "fisher-pooled", "fisher-per-token", "uniform"]
    )
    # Fractions of the pool (< 1) or counts; for fisher-per-token a fraction of loss tokens.
    budgets: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2])
    # Each seed varies the selection (uniform, k-center) and the training order (all arms).
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    ridge: float = Field(default=DEFAULT_RIDGE, gt=0)  # λ for arms that set none
    # > 0: the last `holdout` rows of the ingested pool become the eval split and are never
    # selected. Tune here (a split of the training data), never on data.eval_source.
    holdout: int = Field(default=0, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    # Where the table, CSV and plots are also written (project-relative); None: only MLflow
    # and .sift/studies/.
    results_dir: str | None = None
    name: str = "study"

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        for spec in arms:
            parse_arm(spec, DEFAULT_RIDGE)
        if len(set(arms)) != len(arms):
            raise ValueError("study.arms lists an arm twice")
        return arms


class StudyConfig(BaseModel):
    """`sift study`'s one config: a section per step, defaults here, YAML only overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: IngestConfig = Field(default_factory=lambda: IngestConfig(limit=2000, eval_limit=400))
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    # One epoch keeps the study's 48 trials inside ~30 min on 2 CPU cores.
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=1.0))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="sift-study")
    )
    study: StudySection = Field(default_factory=StudySection)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    def arms(self) -> list[Arm]:
        return [parse_arm(spec, self.study.ridge) for spec in self.study.arms]


class StudyConfigError(ValueError):
    pass


def load_study_config(path: Path | None, overrides: list[tuple[str, Any]]) -> StudyConfig:
    """Defaults, then the YAML file, then (dotted key, value) overrides; errors name the key."""
    return config_files.load_model(StudyConfig, path, overrides, StudyConfigError, "study config")


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


def length_normalised(features: FeaturesRef, out_dir: Path) -> FeaturesRef:
    """The same statistics with every F_i divided by sqrt(T_i): each example contributes its
    mean token Gram (1/T_i) Σ_j x_ij x_ijᵀ, so a long example is worth no more than a short
    one with the same states. Written as a features folder that select_subset reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(features.features_dir)
    arrays = {name: np.load(source / f"{name}.npy") for name in FILES}
    ranks = np.diff(arrays["offsets"])
    per_row = np.repeat(1.0 / np.sqrt(arrays["n_tokens"].astype(np.float64)), ranks)
    arrays["factors"] = (arrays["factors"] * per_row[:, None]).astype(np.float32)
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


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t interval; half-width NaN for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("t_interval needs at least one value")
    if len(x) < 2:
        return float(x.mean()), float("nan")
    quantile = stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1)
    return float(x.mean()), float(quantile * x.std(ddof=1) / np.sqrt(len(x)))


def aggregate(
    records: pd.DataFrame, keys: list[str], metrics: list[str], confidence: float
) -> pd.DataFrame:
    """Per group of `keys`: n, and mean and CI half-width ('<metric>_ci') of each metric."""
    rows = []
    for group, frame in records.groupby(keys, sort=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        row["n"] = len(frame)
        for metric in metrics:
            row[metric], row[f"{metric}_ci"] = t_interval(frame[metric].to_numpy(), confidence)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(
    records: pd.DataFrame,
    metric: str,
    baseline: str,
    confidence: float,
    columns: tuple[str, str, str] = ("arm", "budget", "seed"),
) -> pd.DataFrame:
    """metric(arm, seed) - metric(baseline, seed) per budget, with a t-interval over seeds:
    arms share each seed's training order (or, in the synthetic experiment, each run's
    problem), so pairing removes that noise from the contrast."""
    arm_column, group_column, pair_column = columns
    pivot = records.pivot_table(
        index=[group_column, pair_column], columns=arm_column, values=metric
    )
    rows = []
    for arm in [a for a in records[arm_column].unique() if a != baseline and baseline in pivot]:
        for group, frame in (pivot[arm] - pivot[baseline]).dropna().groupby(level=group_column):
            mean, half = t_interval(frame.to_numpy(), confidence)
            rows.append({arm_column: arm, group_column: group, "n": len(frame), "delta": mean})
            rows[-1]["delta_ci"] = half
    return pd.DataFrame(rows, columns=[arm_column, group_column, "n", "delta", "delta_ci"])


def _with_ci(mean: float, half: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(frame.columns))) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def results_table(summary: pd.DataFrame, deltas: pd.DataFrame) -> str:
    """Markdown: eval loss ± CI, Δ vs the baseline ± CI, sizes and times per arm × budget."""
    merged = summary.merge(deltas, on=["arm", "budget"], how="left", suffixes=("", "_delta"))
    frame = pd.DataFrame(
        {
            "arm": merged.arm,
            "budget": [f"{b:g}" for b in merged.budget],
            "seeds": merged.n,
            "examples": merged.examples.round().astype(int),
            "loss tokens": merged.loss_tokens.round().astype(int),
            "tokens trained": merged.tokens_trained.round().astype(int),
            "eval loss": [
                _with_ci(m, h) for m, h in zip(merged.eval_loss, merged.eval_loss_ci, strict=True)
            ],
            f"Δ vs {BASELINE}": [
                "" if np.isnan(m) else _with_ci(m, h)
                for m, h in zip(merged.delta, merged.delta_ci, strict=True)
            ],
            "select s": merged.select_seconds.round(2),
            "train s": merged.train_seconds.round(1),
        }
    )
    return _markdown(frame)


def profile_table(summary: pd.DataFrame) -> str:
    """Markdown: what each arm picked (means over seeds) next to the pool's averages."""
    first = summary.iloc[0]
    frame = pd.DataFrame(
        {
            "arm": summary.arm,
            "budget": [f"{b:g}" for b in summary.budget],
            "tokens/example": summary.tokens_per_example.round(1),
            "state norm": summary.state_norm.round(3),
            "base loss": summary.base_loss.round(3),
            "outlier": summary.outlier.round(2),
            "held-out leverage mean": summary.heldout_leverage_mean.map(lambda v: f"{v:.3g}"),
            "held-out leverage max": summary.heldout_leverage_max.map(lambda v: f"{v:.3g}"),
        }
    )
    pool_row = (
        f"\n\nPool averages: {first.pool_tokens_per_example:.1f} tokens/example, state norm "
        f"{first.pool_state_norm:.3f}, base loss {first.pool_base_loss:.3f}, "
        f"outlier {first.pool_outlier:.2f}."
    )
    return _markdown(frame) + pool_row


def plot_study(summary: pd.DataFrame, base_loss: float, title: str, path: Path) -> None:
    """Eval loss ± CI against examples selected and against tokens trained, one line per arm."""
    figure = Figure(figsize=(11, 4))
    by_examples, by_tokens = figure.subplots(1, 2)
    for arm, frame in summary.groupby("arm", sort=False):
        frame = frame.sort_values("examples")
        ci = frame.eval_loss_ci.fillna(0.0)
        for axis, x in ((by_examples, frame.examples), (by_tokens, frame.tokens_trained)):
            axis.errorbar(x, frame.eval_loss, yerr=ci, marker="o", capsize=3, label=str(arm))
    for axis, label in ((by_examples, "examples selected"), (by_tokens, "tokens trained")):
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("eval loss (nats/response token)")
        axis.grid(alpha=0.3)
    by_examples.set_title(f"{title} (base model {base_loss:.2f})")
    by_tokens.set_title("same runs, by training tokens")
    by_tokens.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def synthetic_summary(records: pd.DataFrame, confidence: float) -> pd.DataFrame:
    return aggregate(
        records, ["selector", "sentences"], ["max_error", "mean_error", "tokens"], confidence
    )


def synthetic_table(records: pd.DataFrame, summary: pd.DataFrame, confidence: float) -> str:
    """Markdown: max error, mean error (each ± CI, with fisher - uniform paired over runs) and
    tokens picked, n sentences as rows and selectors as columns."""
    parts = []
    for metric, title in (("max_error", "Maximum"), ("mean_error", "Mean")):
        wide = summary.pivot(index="sentences", columns="selector", values=metric)
        half = summary.pivot(index="sentences", columns="selector", values=f"{metric}_ci")
        frame = pd.DataFrame({"n sentences": wide.index})
        for selector in summary.selector.unique():
            frame[selector] = list(map(_with_ci, wide[selector], half[selector]))
        columns = ("selector", "sentences", "run")
        deltas = paired_differences(records, metric, BASELINE, confidence, columns)
        fisher = deltas[deltas.selector == "fisher"].set_index("sentences")
        if len(fisher):
            delta = list(map(_with_ci, fisher.delta, fisher.delta_ci))
            frame[f"fisher − {BASELINE} (paired)"] = delta
        parts.append(f"{title} prediction error:\n\n{_markdown(frame)}")
    tokens = summary.pivot(index="sentences", columns="selector", values="tokens").round()
    tokens = tokens[list(summary.selector.unique())].astype(int).reset_index()
    parts.append(f"Tokens in the selected sentences:\n\n{_markdown(tokens)}")
    return "\n\n".join(parts)


def plot_synthetic(summary: pd.DataFrame, runs: int, path: Path) -> None:
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    for selector, frame in summary.groupby("selector", sort=False):
        for axis, metric in zip(axes, ("max_error", "mean_error"), strict=True):
            axis.errorbar(
                frame.sentences,
                frame[metric],
                yerr=frame[f"{metric}_ci"].fillna(0.0),
                marker="o",
                capsize=3,
                label=str(selector),
            )
    for axis, name in zip(axes, ("Maximum", "Mean"), strict=True):
        axis.set_xscale("log")
        axis.minorticks_off()  # label exactly the n values run, not log-scale minor ticks
        axis.set_xticks(sorted(summary.sentences.unique()))
        axis.set_xticklabels([str(n) for n in sorted(summary.sentences.unique())])
        axis.set_xlabel("sentences selected")
        axis.set_ylabel("prediction error (total variation)")
        axis.set_title(f"{name} prediction error, {runs} runs (95% CI)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_json(value: object, path: Path) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))
