"""What scoring a model yields: its held-out loss and benchmark scores, each with its error.

The registry's gate (steps/registry/gate.py) compares these; evaluation knows nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EVAL_LOSS_METRIC = "eval_loss"


@dataclass(frozen=True)
class Measured:
    value: float
    stderr: float | None = None


@dataclass(frozen=True)
class Scored:
    """A model's scores on one eval split (by DVC md5) and one benchmark plan."""

    loss: float
    eval_md5: str
    bench_fingerprint: str = ""  # "": no benchmarks
    loss_stderr: float | None = None
    bench: dict[str, Measured] = field(default_factory=dict)  # task/metric[/filter] → score
    higher_is_better: dict[str, bool] = field(default_factory=dict)

    def measured(self, metric: str) -> Measured:
        if metric == EVAL_LOSS_METRIC:
            return Measured(self.loss, self.loss_stderr)
        if metric not in self.bench:
            raise ValueError(
                f"registry.gate.metric={metric!r}: not scored (scores: eval_loss, "
                f"{', '.join(sorted(self.bench)) or 'no benchmarks'})"
            )
        return self.bench[metric]
