"""The study's statistics, tables and plots: confidence intervals, aggregation over seeds,
paired differences against uniform, markdown tables and figures. No Prefect, no MLflow.

steps/study/study.py defines the study and its trials; flows/study.py runs them and hands
the per-trial records to the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from matplotlib.ticker import NullFormatter
from scipy import stats

from steps.study.study import BASELINE

# What each budget kind compares at: the heading of its section of the results table.
KIND_TITLES: dict[str, str] = {
    "examples": "Equal examples: each budget counts examples (fisher-per-token's counts loss "
    "tokens), trained in batches of finetune.batch_size.",
    "tokens": "Equal tokens: each budget is select.budget_tokens for every arm, and every arm "
    "trains the optimiser steps uniform takes at the same fraction of examples (finetune.steps).",
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


def paired_by_kind(
    records: pd.DataFrame, metric: str, baseline: str, confidence: float
) -> pd.DataFrame:
    """paired_differences within each budget kind: a trial pairs with the baseline's at the
    same (budget_kind, budget, seed), never across kinds."""
    parts = [
        paired_differences(frame, metric, baseline, confidence).assign(budget_kind=kind)
        for kind, frame in records.groupby("budget_kind", sort=False)
    ]
    return pd.concat(parts, ignore_index=True)


def _by_kind(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(str(kind), frame) for kind, frame in summary.groupby("budget_kind", sort=False)]


def _with_ci(mean: float, half: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(frame.columns))) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def results_table(summary: pd.DataFrame, deltas: pd.DataFrame) -> str:
    """Markdown, a section per budget kind (KIND_TITLES): eval loss ± CI, Δ vs the baseline ±
    CI, the examples, tokens and optimiser steps trained, and times per arm × budget."""
    keys = ["budget_kind", "arm", "budget"]
    merged = summary.merge(deltas, on=keys, how="left", suffixes=("", "_delta"))
    return "\n\n".join(
        f"{KIND_TITLES[kind]}\n\n{_results_rows(frame)}" for kind, frame in _by_kind(merged)
    )


def _results_rows(merged: pd.DataFrame) -> str:
    frame = pd.DataFrame(
        {
            "arm": merged.arm,
            "budget": [f"{b:g}" for b in merged.budget],
            "seeds": merged.n,
            "examples": merged.examples.round().astype(int),
            "loss tokens": merged.loss_tokens.round().astype(int),
            "tokens trained": merged.tokens_trained.round().astype(int),
            "steps": merged.steps.round().astype(int),
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
    return markdown(frame)


def profile_table(summary: pd.DataFrame) -> str:
    """Markdown: what each arm picked (means over seeds), a section per budget kind, then the
    pool's averages."""
    first = summary.iloc[0]
    pool_row = (
        f"Pool averages: {first.pool_tokens_per_example:.1f} tokens/example, state norm "
        f"{first.pool_state_norm:.3f}, base loss {first.pool_base_loss:.3f}, "
        f"outlier {first.pool_outlier:.2f}."
    )
    sections = [f"{kind}:\n\n{_profile_rows(frame)}" for kind, frame in _by_kind(summary)]
    return "\n\n".join([*sections, pool_row])


def _profile_rows(summary: pd.DataFrame) -> str:
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
    return markdown(frame)


# A budget kind's plot panel: (x column, x label, title).
PANELS = {
    "examples": ("examples", "examples selected", "equal examples"),
    "tokens": ("loss_tokens", "loss tokens selected (the token budget)", "equal tokens and steps"),
}


def plot_study(summary: pd.DataFrame, base_loss: float, title: str, path: Path) -> None:
    """Eval loss ± CI, one line per arm and a panel per budget kind: against examples
    selected at equal examples, against the loss tokens selected at equal tokens (ticks at
    the measured points). An examples-only study also gets its runs against tokens trained
    (what the equal-examples arms cost)."""
    panels = [(kind, *PANELS[kind]) for kind, _ in _by_kind(summary)]
    if [kind for kind, *_ in panels] == ["examples"]:
        panels.append(("examples", "tokens_trained", "tokens trained", "same runs, by tokens"))
    figure = Figure(figsize=(5.5 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (kind, x, label, name) in zip(axes, panels, strict=True):
        for arm, frame in summary[summary.budget_kind == kind].groupby("arm", sort=False):
            frame = frame.sort_values(x)
            ci = frame.eval_loss_ci.fillna(0.0)
            axis.errorbar(frame[x], frame.eval_loss, yerr=ci, marker="o", capsize=3,
                          label=str(arm))  # fmt: skip
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short spans
        ticks = _tick_values(summary[summary.budget_kind == kind], x)
        if len(ticks) <= 8:  # a log axis over a short span may hold no major tick at all
            axis.set_xticks(ticks, [_short(t) for t in ticks])
        axis.set_xlabel(label)
        axis.set_ylabel("eval loss (nats/response token)")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    axes[0].set_title(f"{title}, {panels[0][3]} (base model {base_loss:.2f})")
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _tick_values(summary: pd.DataFrame, x: str) -> list[float]:
    """The baseline's measured points when it was run (another arm's nearby points, e.g.
    fisher-per-token's 48 examples beside uniform's 50, would print over them), else all."""
    measured = summary[summary.arm == BASELINE] if (summary.arm == BASELINE).any() else summary
    return sorted(measured[x].round().unique())


def _short(value: float) -> str:
    """12345 -> '12.3k', 41 -> '41': tick labels that fit beside each other."""
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


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
        parts.append(f"{title} prediction error:\n\n{markdown(frame)}")
    tokens = summary.pivot(index="sentences", columns="selector", values="tokens").round()
    tokens = tokens[list(summary.selector.unique())].astype(int).reset_index()
    parts.append(f"Tokens in the selected sentences:\n\n{markdown(tokens)}")
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
