"""The budget advisor's knee beside the knee of measured eval-loss-vs-budget curves.

    python benchmarks/advise_vs_measured.py                 # the committed studies below
    python benchmarks/advise_vs_measured.py --study gsm8k   # one of them

For each study (its config and its committed results in docs/results/<name>/), `sift advise`'s
computation (steps/selection/advise.py advise_file) runs on the study's own pool (same data,
model and embed sections, selector `fisher`), before and apart from any training, and its
suggested budget is set beside the measured knee of each arm's mean eval loss against the
number of examples trained on (summary.csv, mean over seeds).

The measured knee uses the advisor's own rule (1), on eval loss in place of information
gain: the reference is the per-example return of the first budget, (base loss - loss(b_1)) /
b_1, and the knee is the smallest measured budget past which every further segment returns
at most 5% of it per example (the largest budget, with nothing measured past it, is never a
knee). A curve that never gets there has no knee in the measured range.
Budgets are coarse (4 points) and seeds few (3), so a measured knee is only located to within
its neighbouring budgets. A cost study's summary is read at equal examples.
Writes docs/results/advisor/{table.md,advisor_vs_measured.png}.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from steps.hardware import resolve_hardware
from steps.modeling import model_source
from steps.selection.advise import AdviseSettings, advise_file, write_advice
from steps.selection.select import SelectConfig
from steps.study.study import load_study_config

REPO = Path(__file__).resolve().parents[1]
# Not gsm8k-cost: its 5,150 raw rows hold two whose prompts fill the context (rows 1202 and
# 3331), which the study's gate quarantines and advise_file, reading the raw data, refuses.
STUDIES = {"gsm8k": "configs/study.yaml", "alpaca": "configs/study-alpaca.yaml"}
OUT = REPO / "docs" / "results" / "advisor"


def measured_knee(
    examples: np.ndarray, loss: np.ndarray, base: float, fraction: float
) -> int | None:
    """The smallest measured budget past which each further example lowers eval loss by at
    most `fraction` of what each example of the first budget did (None: no such budget)."""
    order = np.argsort(examples)
    k, y = examples[order].astype(float), loss[order]
    reference = (base - y[0]) / k[0]
    slopes = (y[:-1] - y[1:]) / np.diff(k)  # per-example return of each later segment
    for i in range(len(k) - 1):  # a knee needs a measured segment past it
        if np.all(slopes[i:] <= fraction * reference):
            return int(k[i])
    return None


def base_loss(table: Path) -> float:
    """The base model's eval loss from a study's table.md header."""
    match = re.search(r"Base model eval loss: ([0-9]+\.[0-9]+)", table.read_text())
    if match is None:
        raise ValueError(f"{table} does not state the base model's eval loss")
    return float(match.group(1))


def run(name: str, config_path: str, work: Path) -> tuple[list[dict], dict]:
    config = load_study_config(REPO / config_path, [])
    results = REPO / (config.study.results_dir or f"docs/results/{name}")
    summary = pd.read_csv(results / "summary.csv")
    if "budget_kind" in summary:  # the cost studies: the curve at equal examples
        summary = summary[summary["budget_kind"] == "examples"]
    base = base_loss(results / "table.md")
    device, precision = resolve_hardware(config.model)
    advice = advise_file(
        config.data,
        model_source(config.model, REPO / ".sift").config,  # a GGUF: its converted folder
        config.embed,
        SelectConfig(selector="fisher", ridge=config.study.ridge),
        work / name,
        device=device,
        precision=precision,
        project_dir=REPO,
    )
    write_advice(advice, work / name)
    fraction = AdviseSettings().gain_fraction
    rows = []
    curves = {}
    for arm, frame in summary.groupby("arm"):
        examples, loss = frame["examples"].to_numpy(), frame["eval_loss"].to_numpy()
        curves[arm] = (examples, loss)
        knee = measured_knee(examples, loss, base, fraction)
        rows.append({
            "study": name, "arm": arm, "pool": int(config.data.limit or 0),
            "advisor knee (examples)": advice.examples,
            "advisor flattened": advice.flattened,
            "measured knee (examples)": f"none ≤ {examples.max():.0f}" if knee is None else knee,
            "measured budgets": "/".join(str(int(e)) for e in sorted(examples)),
        })  # fmt: skip
    return rows, {"base": base, "curves": curves, "advice": advice.examples}


def plot(panels: dict[str, dict], path: Path) -> None:
    figure = Figure(figsize=(5.5 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (name, panel) in zip(axes, panels.items(), strict=True):
        for arm, (examples, loss) in sorted(panel["curves"].items()):
            order = np.argsort(examples)
            axis.plot(examples[order], loss[order], marker="o", label=arm)
        axis.axhline(panel["base"], color="grey", ls=":", label="base model")
        axis.axvline(panel["advice"], color="red", ls="--", label=f"advisor: k={panel['advice']}")
        axis.set_xscale("log")
        axis.set_xlabel("examples trained on")
        axis.set_ylabel("eval loss (mean over seeds)")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), action="append")
    parser.add_argument("--work", default=str(REPO / ".sift" / "advise-vs-measured"))
    args = parser.parse_args()
    rows, panels = [], {}
    for name in args.study or sorted(STUDIES):
        found, panels[name] = run(name, STUDIES[name], Path(args.work))
        rows += found
    OUT.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.to_numpy())
    (OUT / "table.md").write_text(header + body)
    (OUT / "advice.json").write_text(
        json.dumps({name: panel["advice"] for name, panel in panels.items()}, indent=2) + "\n"
    )
    plot(panels, OUT / "advisor_vs_measured.png")
    print(header + body)


if __name__ == "__main__":
    main()
