"""The default selector is the one the committed cost studies support (steps/study/ranking.py):
the rule on hand-made trials, and the configured default against the committed results."""

from __future__ import annotations

import numpy as np
import pandas as pd

from steps.selection.embedding.embed import EmbedConfig
from steps.selection.select import EMBED_NEEDS, SelectConfig
from steps.study.ranking import chosen_default, rank_selectors, read_trials
from tests.conftest import REPO

COST_STUDIES = ["gsm8k-cost", "alpaca-cost", "llamafactory-cost"]


def _trials(shift: dict[str, float], seeds: int = 6) -> pd.DataFrame:
    """Each arm's eval loss = uniform's at the same seed + its shift + a little noise."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        base = 3.0 + 0.1 * rng.standard_normal()
        for arm, delta in {"uniform": 0.0, **shift}.items():
            loss = base + delta + 0.001 * rng.standard_normal()
            rows.append({"arm": arm, "budget_kind": "examples", "budget": 0.1, "seed": seed,
                         "eval_loss": loss})  # fmt: skip
    return pd.DataFrame(rows)


def test_an_edge_needs_wins_on_two_datasets_and_the_lowest_mean_delta_among_them_is_chosen():
    trials = {
        "a": _trials({"steady": -0.05, "spiky": -0.30, "bad": +0.05}),
        "b": _trials({"steady": -0.04, "spiky": +0.01, "bad": +0.05}),
    }
    ranking = rank_selectors(trials, "examples")
    assert ranking["arm"].tolist() == ["spiky", "steady", "bad"]  # by mean Δ
    rows = ranking.set_index("arm")
    assert rows.loc["steady", "edge"] and not rows.loc["spiky", "edge"]  # one dataset only
    assert (rows.loc["bad", "wins"], rows.loc["bad", "losses"]) == (0, 2)
    assert chosen_default(ranking) == "steady"


def test_uniform_is_the_default_when_no_arm_has_an_edge():
    trials = {"a": _trials({"bad": +0.05}), "b": _trials({"bad": -0.001})}
    assert chosen_default(rank_selectors(trials, "examples")) == "uniform"


def test_the_configured_default_is_what_the_committed_cost_studies_choose():
    trials = read_trials([REPO / "docs" / "results" / name for name in COST_STUDIES])
    chosen = chosen_default(rank_selectors(trials, "examples"))  # Sift's budget counts examples
    assert SelectConfig().selector == chosen
    if chosen in EMBED_NEEDS:  # the default embed pass computes what the default reads
        field, value = EMBED_NEEDS[chosen]
        assert getattr(EmbedConfig(), field) == value
