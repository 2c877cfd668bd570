"""What the study measured for each selector: the one-line caution `sift select` and `sift run`
print when the chosen selector has no measured edge over uniform for the budget kind in use.

MEASURED_EDGES holds only edges that a committed study result shows with a paired 95%
interval excluding 0 in the selector's favour (docs/results/<study>/table.md, "Δ vs
uniform"). Read there when this was written: Alpaca's fisher at 5 examples is the one such
cell; no selector beats uniform at an equal token budget in any committed result (GSM8K's
fisher-per-token, matched to uniform's loss tokens, is +0.022 ± 0.133 at 10% and +0.056 ±
0.067 at 20%). A new study result that excludes 0 earns an entry here, with its file.
"""

from __future__ import annotations

from steps.selection.select import SelectConfig

BASELINE = "uniform"  # the selector every edge is measured against
RESULTS = "docs/results/*/table.md"  # where the committed study results are
BUDGET_KINDS = {"examples": "number of examples", "tokens": "token budget"}

# (selector, budget kind) -> the measured edge over uniform, with the file it comes from.
MEASURED_EDGES: dict[tuple[str, str], str] = {
    ("fisher", "examples"): (
        "fisher: -0.017 ± 0.005 eval loss vs uniform at 5 examples (1% of a 500-example "
        "Alpaca pool, 3 seeds, 2.5x the tokens trained; docs/results/alpaca/table.md); no "
        "other budget's interval excludes 0"
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
        f"{BUDGET_KINDS[budget_kind]} ({RESULTS}); see README Results"
    )


def budget_kind(config: SelectConfig) -> str:
    """The kind a select section's budget counts: "tokens" for select.budget_tokens and for
    fisher-per-token (whose select.budget counts loss tokens too), else "examples"."""
    return "tokens" if config.counts_tokens else "examples"


def select_caution(config: SelectConfig) -> str | None:
    """caution() for a select section: its selector at its budget kind."""
    return caution(config.selector, budget_kind(config))
