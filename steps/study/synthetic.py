"""The FisherSFT paper's synthetic experiment: does information-gain selection lower the
prediction error of a refitted multinomial logit? (docs/concepts/fishersft.md, "Known variants")

Sentences are sets of token vectors x_ij ∈ R^d; each token's label is drawn from a known
multinomial logit, y ~ softmax(Θ x). A selector picks n sentences from a pool (it sees
only the token vectors, never the labels), Θ is refitted by ridge-regularised multinomial
logistic regression on every token of the picked sentences, and the refitted model is
scored on fresh held-out token vectors by the total-variation distance between predicted
and true class probabilities: its maximum (the quantity the paper's bound controls,
through max_x x^T V_S^{-1} x) and its mean. Pure torch/numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from steps.selection.pool import pool_from_tokens
from steps.selection.selectors import DEFAULT_RIDGE, SELECTORS, select


class SyntheticConfig(BaseModel):
    """The synthetic experiment's knobs; runs = 0 skips it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: int = Field(
        default=20,
        ge=0,
        description="Independent repetitions (fresh Θ, pool and test set each); the paper "
        "averages 20; 0 skips the experiment.",
    )
    dim: int = Field(default=16, gt=0, description="d, the token-vector dimension.")
    classes: int = Field(
        default=4, ge=2, description="L, the multinomial logit's number of categories."
    )
    pool_sentences: int = Field(
        default=400, gt=0, description="Sentences in the pool the selectors pick from."
    )
    min_tokens: int = Field(
        default=2,
        gt=0,
        description="Fewest tokens per sentence (lengths ~ U{min_tokens..max_tokens}, unequal "
        "as real sentences).",
    )
    max_tokens: int = Field(default=20, gt=0, description="Most tokens per sentence.")
    # A few directions are rare in the pool, which is where a design (fisher) and a random
    # sample (uniform) differ most.
    spectrum_decay: float = Field(
        default=1.0,
        ge=0,
        description="Per-coordinate scale decays as (1 + k)^-spectrum_decay: larger makes some "
        "directions rarer.",
    )
    theta_scale: float = Field(
        default=3.0,
        gt=0,
        description="Size of Θ's entries: larger makes the logit sharper (probabilities nearer "
        "0/1).",
    )
    test_tokens: int = Field(
        default=4000, gt=0, description="Held-out token vectors the refitted model is scored on."
    )
    sentences: list[int] = Field(
        default_factory=lambda: [5, 10, 20, 40, 80],
        description="Numbers of sentences selected (n), one point of the error curve each.",
    )
    selectors: list[str] = Field(
        default_factory=lambda: ["fisher", "uniform", "fisher-pooled", "k-center", "longest"],
        description="Registry selectors compared.",
    )
    ridge: float = Field(
        default=DEFAULT_RIDGE, gt=0, description="λ of the selection objective."
    )
    fit_ridge: float = Field(
        default=1e-2, gt=0, description="L2 penalty of the refit, on the sum-loss scale."
    )
    fit_steps: int = Field(default=200, gt=0, description="LBFGS iterations of the refit.")

    @field_validator("selectors")
    @classmethod
    def _known_selectors(cls, selectors: list[str]) -> list[str]:
        unknown = [name for name in selectors if name not in SELECTORS]
        if unknown:
            raise ValueError(f"unknown selector(s) {unknown}; choose from {sorted(SELECTORS)}")
        return selectors

    seed: int = Field(
        default=0, description="Seed of every run's Θ, pool, test set and random selectors."
    )


@dataclass(frozen=True)
class SyntheticProblem:
    """One draw of the generative model: the pool's sentences, their labels, a test set."""

    theta: NDArray[np.float64]  # (L, d), the true parameter
    sentences: list[NDArray[np.float64]]  # pool: (T_i, d) token vectors per sentence
    labels: list[NDArray[np.int64]]  # (T_i,) sampled classes per sentence
    test: NDArray[np.float64]  # (M, d) held-out token vectors


def make_problem(config: SyntheticConfig, rng: np.random.Generator) -> SyntheticProblem:
    """Sentences are a sentence-level mean plus token noise, on a decaying spectrum."""
    d, n = config.dim, config.pool_sentences
    scale = (1.0 + np.arange(d)) ** -config.spectrum_decay
    theta = rng.standard_normal((config.classes, d)) * config.theta_scale

    def draw_sentences(count: int) -> list[NDArray[np.float64]]:
        lengths = rng.integers(config.min_tokens, config.max_tokens + 1, size=count)
        return [(rng.standard_normal(d) + rng.standard_normal((t, d))) * scale for t in lengths]

    sentences = draw_sentences(n)
    labels = [_sample_labels(theta, x, rng) for x in sentences]
    test = np.concatenate(draw_sentences(config.test_tokens // config.min_tokens))
    return SyntheticProblem(theta, sentences, labels, test[: config.test_tokens])


def _sample_labels(
    theta: NDArray[np.float64], x: NDArray[np.float64], rng: np.random.Generator
) -> NDArray[np.int64]:
    p = _softmax(x @ theta.T)
    u = rng.random((len(x), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), theta.shape[0] - 1).astype(np.int64)


def _softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_multinomial_logit(
    x: NDArray[np.float64], y: NDArray[np.int64], classes: int, ridge: float, steps: int
) -> NDArray[np.float64]:
    """argmin_Θ Σ_t -log softmax(Θ x_t)[y_t] + ridge ||Θ||², by full-batch LBFGS (float64)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)
    theta = torch.zeros((classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=steps, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ theta.T, yt, reduction="sum")
        loss = loss + ridge * (theta**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach().numpy()


def prediction_errors(
    theta: NDArray[np.float64], fitted: NDArray[np.float64], test: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Total-variation distance between true and refitted class probabilities per test token."""
    return 0.5 * np.abs(_softmax(test @ theta.T) - _softmax(test @ fitted.T)).sum(axis=1)


def run_synthetic(config: SyntheticConfig) -> pd.DataFrame:
    """One row per run × selector × n: max and mean prediction error, tokens picked.

    Runs torch on one thread: the refits are tiny, and on 2 busy cores a second thread made
    each one 4.5x slower (0.73 s vs 3.3 s), so the thread count is set here and restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_synthetic(config)
    finally:
        torch.set_num_threads(threads)


def _run_synthetic(config: SyntheticConfig) -> pd.DataFrame:
    rows = []
    for run in range(config.runs):
        rng = np.random.default_rng([config.seed, run])
        problem = make_problem(config, rng)
        pool = pool_from_tokens(problem.sentences)
        for selector in config.selectors:
            for n in config.sentences:
                picked = select(
                    pool, n, selector, ridge=config.ridge, seed=config.seed * 1000 + run
                ).order
                x = np.concatenate([problem.sentences[i] for i in picked])
                y = np.concatenate([problem.labels[i] for i in picked])
                fitted = fit_multinomial_logit(
                    x, y, config.classes, config.fit_ridge, config.fit_steps
                )
                errors = prediction_errors(problem.theta, fitted, problem.test)
                rows.append(
                    {
                        "run": run,
                        "selector": selector,
                        "sentences": n,
                        "tokens": len(x),
                        "max_error": float(errors.max()),
                        "mean_error": float(errors.mean()),
                    }
                )
    return pd.DataFrame(rows)
