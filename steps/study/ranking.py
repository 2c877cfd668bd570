"""Which selector the evidence supports as the default: every arm's paired Δ against uniform
over the committed studies' cells (dataset × budget) at one budget kind, and the rule that
picks the default from them.

    python -m steps.study.ranking docs/results/gsm8k-cost docs/results/alpaca-cost \
        docs/results/llamafactory-cost            # the table in docs/results/selection-studies.md

The rule: among arms that beat uniform with an interval excluding 0 on at least two datasets
(the bar evidence.MEASURED_EDGES sets), the lowest mean Δ over all cells, each cell weighted
alike; uniform when no arm clears the bar. Losses are counted and printed beside the wins, so
an arm that wins somewhere and loses elsewhere shows both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from steps.study.report import markdown, paired_differences
from steps.study.study import BASELINE

MIN_DATASETS = 2  # an edge counts when it is measured on at least this many datasets


def rank_selectors(
    trials: dict[str, pd.DataFrame], kind: str, confidence: float = 0.95
) -> pd.DataFrame:
    """Per arm at budget kind `kind`: cells, wins and losses (interval excluding 0), the
    datasets it wins on, and its mean Δ vs uniform; best (lowest mean Δ) first.

    trials: dataset name -> a study's trials.csv (arm, budget_kind, budget, seed, eval_loss).
    """
    cells = []
    for dataset, frame in trials.items():
        at_kind = frame[frame["budget_kind"] == kind]
        deltas = paired_differences(at_kind, "eval_loss", BASELINE, confidence)
        cells.append(deltas.assign(dataset=dataset))
    merged = pd.concat(cells, ignore_index=True)
    merged["win"] = merged["delta"] + merged["delta_ci"] < 0
    merged["loss"] = merged["delta"] - merged["delta_ci"] > 0
    rows = []
    for arm, frame in merged.groupby("arm"):
        won = sorted(frame.loc[frame["win"], "dataset"].unique())
        rows.append({
            "arm": arm, "cells": len(frame), "wins": int(frame["win"].sum()),
            "losses": int(frame["loss"].sum()), "datasets won": ", ".join(won) or "none",
            "edge": len(won) >= MIN_DATASETS, "mean Δ": float(frame["delta"].mean()),
        })  # fmt: skip
    return pd.DataFrame(rows).sort_values("mean Δ", ignore_index=True)


def chosen_default(ranking: pd.DataFrame) -> str:
    """The rule of the module docstring applied to rank_selectors' table."""
    with_edge = ranking[ranking["edge"]]
    return BASELINE if with_edge.empty else str(with_edge.iloc[0]["arm"])


def read_trials(results_dirs: list[Path]) -> dict[str, pd.DataFrame]:
    """Each study's trials.csv, by its folder's name."""
    return {path.name: pd.read_csv(path / "trials.csv") for path in results_dirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="docs/results/<study> folders")
    parser.add_argument("--kind", default="examples", choices=["examples", "tokens"])
    args = parser.parse_args()
    ranking = rank_selectors(read_trials(args.results), args.kind)
    shown = ranking.assign(**{"mean Δ": ranking["mean Δ"].map("{:+.3f}".format)})
    print(markdown(shown))
    print(f"\ndefault at equal {args.kind}: {chosen_default(ranking)}")


if __name__ == "__main__":
    main()
