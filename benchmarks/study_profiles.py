"""What each selector variant picks, without training: length, state norm, base-model loss,
outlierness and held-out leverage (steps.study.study.selection_profile) for one budget.

Reads two features folders written by the study's embed step (the pool and a held-out
split of the TRAINING data, e.g. configs/study-tune.yaml's), so it costs seconds:

    python benchmarks/study_profiles.py --features .sift/features/<pool> \
        --heldout .sift/features/<holdout> --budget 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from steps.selection.embedding.embed import FeaturesRef, load_pool
from steps.selection.pool import FeaturePool
from steps.selection.selectors import select
from steps.study.study import length_normalised, parse_arm, selection_profile

ARMS = [
    "uniform",
    "fisher",
    "fisher-per-token",
    "fisher-pooled",
    "fisher:mean",
    "fisher:ridge=1000",
    "fisher:ridge=10000",
    "fisher:ridge=100000",
    "longest",
    "highest-loss",
    "k-center",
]


def features_ref(path: Path) -> FeaturesRef:
    meta = json.loads((path / "meta.json").read_text())
    known = ("features_dir", "examples", "dim", "loss_tokens", "padding_fraction")
    return FeaturesRef(**{k: meta[k] for k in known})


def pick(pool: FeaturePool, normalised: FeaturePool, spec: str, budget: int, seed: int):
    arm = parse_arm(spec, 1e-3)
    source = normalised if arm.length_normalised else pool
    if arm.selector == "fisher-per-token":  # the same share of tokens as of examples
        budget = round(budget / pool.N * int(pool.n_tokens.sum()))
    return select(source, budget, arm.selector, ridge=arm.ridge, seed=seed).order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    ref = features_ref(args.features)
    pool, heldout = load_pool(ref), load_pool(features_ref(args.heldout))
    normalised = load_pool(length_normalised(ref, Path(f"{ref.features_dir}-length-normalised")))
    columns = ["tokens_per_example", "state_norm", "base_loss", "outlier"]
    columns += ["heldout_leverage_mean", "heldout_leverage_max"]
    print("| arm | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for spec in ARMS:
        seeds = range(args.seeds) if spec in ("uniform", "k-center") else [0]
        profiles = [
            selection_profile(pool, pick(pool, normalised, spec, args.budget, s), heldout, 1e-3)
            for s in seeds
        ]
        means = [np.mean([p[c] for p in profiles]) for c in columns]
        print(f"| {spec} | " + " | ".join(f"{m:.4g}" for m in means) + " |")
    first = profiles[0]
    print(
        f"\npool: {first['pool_tokens_per_example']:.1f} tokens/example, state norm "
        f"{first['pool_state_norm']:.3f}, base loss {first['pool_base_loss']:.3f}, "
        f"outlier {first['pool_outlier']:.2f}"
    )
    # The length bonus: each example's gain against a typical design (a uniform 10% sample).
    rows = [
        pool.factors[a:b].astype(np.float64)
        for a, b in zip(pool.offsets[:-1], pool.offsets[1:], strict=True)
    ]
    sample = pick(pool, normalised, "uniform", args.budget, 0)
    v = 1e-3 * np.eye(pool.d) + sum(rows[i].T @ rows[i] for i in sample)
    base = np.linalg.slogdet(v)[1]
    gain = np.array([np.linalg.slogdet(v + f.T @ f)[1] - base for f in rows])
    rho = stats.spearmanr(pool.n_tokens, gain).statistic
    print(f"Spearman correlation of gain (vs a uniform {args.budget}) with length: {rho:.3f}")


if __name__ == "__main__":
    main()
