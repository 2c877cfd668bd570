"""The promotion gate: which metric decides, in which direction, by what margin.

`registry.gate.metric` is `eval_loss` (held-out loss, lower is better) or any benchmark
score as `task/metric` (`task/metric/filter` where lm-eval applies a filter, e.g.
`gsm8k/exact_match/flexible-extract`). The challenger is promoted only when it beats the
champion by more than `min_margin` and, where both scores have a standard error, by more
than their combined standard error: ties and noise never move `champion`. The held-out
loss has one as well (over response tokens, steps/evaluation/evaluate.py).

With no champion yet, `first_version` says what the first version must beat: nothing
(`promote`, the default), or the base model it was tuned from, by the same rule
(`beat_base`): a fine-tune that lowers the loss but loses the gate's benchmark is not promoted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from steps.evaluation.results import EVAL_LOSS_METRIC, Measured

# Version tags: what the version was scored on, and its benchmark scores.
BENCH_FINGERPRINT, BENCH_SCORES = "sift.bench_fingerprint", "sift.bench_scores"
EVAL_LOSS_STDERR = "sift.eval_loss_stderr"
GATE_DECISION = "sift.gate"


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(
        default=EVAL_LOSS_METRIC,
        description="What decides: eval_loss (held-out loss) or a benchmark score as task/metric "
        "(task/metric/filter where lm-eval filters).",
    )
    # auto reads lm-eval's higher_is_better for benchmark metrics.
    direction: Literal["auto", "lower", "higher"] = Field(
        default="auto",
        description="Which way is better; auto: lower for eval_loss and perplexity-like "
        "metrics, else lm-eval's own.",
    )
    min_margin: float = Field(
        default=0.0,
        ge=0.0,
        description="Promote only when the challenger beats champion by more than this and by "
        "more than the combined standard error.",
    )
    first_version: Literal["promote", "beat_base"] = Field(
        default="promote",
        description="With no champion yet: promote the first version (promote), or only when it "
        "beats the base model it was tuned from on the gate's metric, by the same rule "
        "(beat_base).",
    )


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    numbers: dict[str, float]


def check_gate_metric(config: GateConfig, benchmark_keys: set[str]) -> None:
    """At load time: the gate's metric must be one the run will score."""
    if config.metric != EVAL_LOSS_METRIC and config.metric not in benchmark_keys:
        known = ", ".join(sorted(benchmark_keys)) or "no benchmarks (eval.suite=none)"
        raise ValueError(
            f"registry.gate.metric={config.metric!r}: not a score of this run; use eval_loss "
            f"or one of: {known}"
        )


def lower_is_better(config: GateConfig, higher_is_better: bool | None) -> bool:
    if config.direction != "auto":
        return config.direction == "lower"
    if config.metric == EVAL_LOSS_METRIC:
        return True
    return not higher_is_better if higher_is_better is not None else False


def decide(
    challenger: Measured,
    champion: Measured,
    config: GateConfig,
    lower: bool,
    against: str = "champion",
) -> Decision:
    """Promote when the improvement exceeds both min_margin and the combined stderr; `against`
    names what the challenger was measured against in the reason ("champion", "base model")."""
    gain = (champion.value - challenger.value) if lower else (challenger.value - champion.value)
    errors = (challenger.stderr, champion.stderr)
    noise = math.hypot(*errors) if all(e is not None for e in errors) else 0.0  # type: ignore[arg-type]
    numbers = {
        config.metric: challenger.value,
        f"previous_{config.metric}": champion.value,
        "improvement": gain,
        "min_margin": config.min_margin,
        "combined_stderr": noise,
    }
    better = "lower" if lower else "higher"
    name = config.metric
    if gain > config.min_margin and gain > noise:
        reason = (
            f"{name} {challenger.value:.4f} vs {against}'s {champion.value:.4f} ({better} is "
            f"better): improvement {gain:.3g} > margin {config.min_margin:g}"
            + (f" and > combined stderr {noise:.3g}" if noise else "")
        )
        return Decision(True, reason, numbers)
    short = "the margin" if gain <= config.min_margin else "the combined stderr"
    reason = (
        f"{name} {challenger.value:.4f} vs {against}'s {champion.value:.4f} ({better} is "
        f"better): improvement {gain:.3g} does not exceed {short} "
        f"(margin {config.min_margin:g}, stderr {noise:.3g})"
    )
    return Decision(False, reason, numbers)


def scores_tag(scores: dict[str, Measured]) -> str:
    return json.dumps({k: [m.value, m.stderr] for k, m in sorted(scores.items())})


def parse_scores_tag(text: str | None) -> dict[str, Measured]:
    if not text:
        return {}
    return {k: Measured(v[0], v[1]) for k, v in json.loads(text).items()}
