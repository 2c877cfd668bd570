"""What the study measured for each selector: the one-line caution `sift select` and `sift run`
print when the chosen selector has no measured edge over uniform for the budget kind in use.

MEASURED_EDGES holds a (selector, budget kind) only where committed study results show it
beating uniform with a paired 95% interval excluding 0 on at least two datasets
(docs/results/<study>/table.md, "Δ vs uniform"); its statement says where it also loses. From
the cost studies (docs/results/{gsm8k,alpaca,llamafactory}-cost, 10 seeds, tuning splits):
at equal examples fisher and fisher-label win on Alpaca and LLaMA-Factory's demo and lose or
tie on GSM8K (50-1,000 examples), at 1.5-2.9x uniform's loss tokens; fisher-per-token loses
every cell it ran (GSM8K, Alpaca); at an equal token budget no selector wins on any dataset
(18 of the 22 cells are significantly worse than uniform). A new result can add or remove an
entry, with its files (tests/unit/test_evidence.py checks each figure is in them).
"""

from __future__ import annotations

from steps.selection.select import SelectConfig

BASELINE = "uniform"  # the selector every edge is measured against
RESULTS = "docs/results/*/table.md"  # where the committed study results are
RESULTS_PAGE = "docs/results/selection-studies.md"  # the page that reads them
BUDGET_KINDS = {"examples": "number of examples", "tokens": "token budget"}

# (selector, budget kind) -> the measured edge over uniform, with the file it comes from.
MEASURED_EDGES: dict[tuple[str, str], str] = {
    ("fisher", "examples"): (
        "fisher at equal examples: -0.166 ± 0.089 / -0.176 ± 0.020 eval loss vs uniform at "
        "32 / 130 Alpaca examples (docs/results/alpaca-cost/table.md), -0.023 ± 0.014 at 164 "
        "LLaMA-Factory examples (docs/results/llamafactory-cost/table.md), but +0.104 ± 0.030 "
        "at 41 there and +0.034 ± 0.020 at 300 GSM8K examples "
        "(docs/results/gsm8k-cost/table.md); 1.7-2.8x the loss tokens"
    ),
    ("fisher-label", "examples"): (
        "fisher-label at equal examples: -0.170 ± 0.093 / -0.169 ± 0.022 at 32 / 130 Alpaca "
        "examples (docs/results/alpaca-cost/table.md), -0.075 ± 0.018 at 164 LLaMA-Factory "
        "examples (docs/results/llamafactory-cost/table.md), but +0.031 ± 0.025 at 100 GSM8K "
        "examples (docs/results/gsm8k-cost/table.md); 1.7-2.9x the loss tokens"
    ),
}


def caution(selector: str, budget_kind: str) -> str | None:
    """The caution line for `selector` at `budget_kind` ("examples" or "tokens"); None for
    uniform and for a selector with a measured edge (MEASURED_EDGES) at that kind."""
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"budget kind {budget_kind!r}: choose one of {', '.join(BUDGET_KINDS)}")
    if selector == BASELINE or (selector, budget_kind) in MEASURED_EDGES:
        return None
    return (
        f"caution: {selector} has no measured edge over {BASELINE} at an equal "
        f"{BUDGET_KINDS[budget_kind]} ({RESULTS}); see {RESULTS_PAGE}"
    )


def budget_kind(config: SelectConfig) -> str:
    """The kind a select section's budget counts: "tokens" for select.budget_tokens and for
    fisher-per-token (whose select.budget counts loss tokens too), else "examples"."""
    return "tokens" if config.counts_tokens else "examples"


def select_caution(config: SelectConfig) -> str | None:
    """caution() for a select section: its selector at its budget kind."""
    return caution(config.selector, budget_kind(config))
