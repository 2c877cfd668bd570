"""`sift models --history`'s loss column: the two losses compared, whatever else the gate
recorded beside them (flows/cli/models.py)."""

from __future__ import annotations

from flows.cli.models import _to_vs_from


def test_the_gate_event_shows_its_two_losses_not_its_margin_and_stderr():
    gate = {"eval_loss": 3.0193, "previous_eval_loss": 2.499, "improvement": -0.5203,
            "min_margin": 0.0, "combined_stderr": 0.0103}  # fmt: skip
    assert _to_vs_from(gate) == "3.0193 vs 2.4990"
    assert _to_vs_from({"eval_loss": 2.499, "previous_eval_loss": 3.0193}) == "2.4990 vs 3.0193"
    assert _to_vs_from({"eval_loss": 2.499}) == "2.4990"  # a first version: nothing to compare
