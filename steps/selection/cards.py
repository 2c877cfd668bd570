"""The selector registry's cards: what each SELECTORS entry picks, where it comes from, what
it reads and what it costs. docs/reference/selectors.md is generated from them
(`python -m flows.cli.reference`); tests/unit/test_reference_docs.py checks there is one card
per registry entry, in its order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectorCard:
    """What a user weighs before choosing a registry selector."""

    summary: str  # what it picks, in one line
    source: str  # the paper or method it comes from
    needs: str  # what it reads: which statistics of the embedding pass, settings, files
    cost: str  # its time (and memory) as the code's docstrings state them


# N pool examples, k picks, d the (sketched) state width, r an example's factor rank.
_SCORED = "; the objective after each pick costs k serial rank-r updates, O(k r d^2)"

# One card per SELECTORS entry (steps/selection/selectors.py), in its order.
SELECTOR_CARDS: dict[str, SelectorCard] = {
    "fisher": SelectorCard(
        summary="Greedy max of the token-level information gain log det(λI + prior + V_S).",
        source="FisherSFT (Deb et al., ICML 2025, arXiv 2505.14826): its greedy with cached "
        "gains (lazy greedy), within (1 - 1/e) of the best set; docs/concepts/fishersft.md",
        needs="The embedding pass: each example's factors (Gram of its loss tokens' states).",
        cost="Plain greedy is O(k N r d^2); lazy greedy re-evaluates only the few candidates "
        "whose bounds reach the top, each pick a Woodbury downdate O(r d^2).",
    ),
    "fisher-per-token": SelectorCard(
        summary="The largest gain per loss token among the examples that fit, until none fits.",
        source="Sift's cost-benefit variant of FisherSFT; on its own it carries no (1 - 1/e) "
        "guarantee",
        needs="The embedding pass: factors and loss-token counts; its budget counts loss tokens.",
        cost="As fisher (lazy greedy on gain / tokens).",
    ),
    "fisher-label": SelectorCard(
        summary="fisher with each token's x xᵀ weighted by w = ‖p − e_y‖²: tokens the base "
        "model already predicts add nothing.",
        source="Sift's label-aware FisherSFT: the token's share of the last layer's empirical "
        "Fisher (p − e_y)(p − e_y)ᵀ ⊗ x xᵀ",
        needs="The embedding pass with embed.token_weight=label (a vocabulary softmax per loss "
        "token and a second factor per example).",
        cost="As fisher, on the label-weighted factors; the plain objective after each pick "
        "then costs k serial rank-r updates, O(k r d^2).",
    ),
    "fisher-target": SelectorCard(
        summary="The examples that most lower the mean leverage of a target sample's states.",
        source="V-optimal (transductive) experimental design on the states of the prompts the "
        "model should serve (steps/selection/targeted.py)",
        needs="The embedding pass, plus select.target: a file of prompts, embedded with the "
        "same model (never the eval split).",
        cost="Plain greedy (not submodular): every pick bounds every candidate in O(R d q) "
        "(R factor rows in the pool, q <= d), scores exactly only those near the top, and "
        "re-factors V in O(d^3).",
    ),
    "fisher-pooled": SelectorCard(
        summary="Greedy log det over one L2-normalised mean state per example "
        "(sentence-level design).",
        source="The sentence-level design of DataFlex's `fisher_sft` selector, a third-party "
        "FisherSFT reimplementation (docs/concepts/fishersft.md, Known variants)",
        needs="The embedding pass: each example's mean state over its loss tokens (pooled).",
        cost="Sherman-Morrison updates: O(N d) per pick, O(k N d) in all" + _SCORED + ".",
    ),
    "uniform": SelectorCard(
        summary="k examples drawn uniformly at random (select.seed); the baseline every "
        "measured edge is against.",
        source="Uniform sampling, the FisherSFT paper's baseline",
        needs="Nothing to pick; the embedding pass only to score the picks.",
        cost="O(k) to draw" + _SCORED + ".",
    ),
    "longest": SelectorCard(
        summary="The k examples with the most loss-bearing tokens.",
        source="Length baseline",
        needs="Loss-token counts from the embedding pass.",
        cost="One O(N log N) sort" + _SCORED + ".",
    ),
    "highest-loss": SelectorCard(
        summary="The k examples the base model finds hardest (mean loss per token).",
        source="Loss-based (hardest-first) baseline",
        needs="The base model's loss per example from the embedding pass.",
        cost="One O(N log N) sort" + _SCORED + ".",
    ),
    "k-center": SelectorCard(
        summary="Greedy farthest-point coverage of the mean states, from a seeded random start.",
        source="The k-center core-set of Sener & Savarese, ICLR 2018",
        needs="The embedding pass: each example's mean state (pooled).",
        cost="One (N, d) matrix-vector product per pick, O(k N d) in all" + _SCORED + ".",
    ),
}
