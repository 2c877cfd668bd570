"""The study's pure logic: t-intervals, aggregation, paired contrasts, arms, config errors,
length normalisation, the selection profile against brute force, the tuning split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steps.selection.embed import FeaturesRef, load_pool
from steps.selection.pool import pool_from_tokens
from steps.study.study import (
    StudyConfigError,
    aggregate,
    length_normalised,
    load_study_config,
    paired_differences,
    parse_arm,
    results_table,
    selection_profile,
    split_holdout,
    t_interval,
)


def test_t_interval_matches_the_textbook_formula():
    mean, half = t_interval([1.0, 2.0, 3.0], 0.95)
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))  # t_{0.975, 2} s / √n
    assert t_interval([5.0, 5.0], 0.9) == (5.0, 0.0)
    single_mean, single_half = t_interval([4.0])
    assert single_mean == 4.0 and np.isnan(single_half)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


def test_t_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        mean, half = t_interval(rng.normal(1.0, 2.0, size=3), 0.95)
        covered += abs(mean - 1.0) <= half
    assert 0.93 < covered / 2000 < 0.97


def _records() -> pd.DataFrame:
    rows = []
    for seed, noise in enumerate([0.0, 0.1, -0.1]):
        for arm, shift in (("uniform", 0.0), ("fisher", 0.05)):
            for budget in (0.1, 0.2):
                rows.append(
                    {"arm": arm, "budget": budget, "seed": seed, "eval_loss": 2 + shift + noise}
                )
    return pd.DataFrame(rows)


def test_aggregate_and_paired_differences():
    records = _records()
    summary = aggregate(records, ["arm", "budget"], ["eval_loss"], 0.95)
    assert len(summary) == 4 and (summary.n == 3).all()
    fisher = summary[(summary.arm == "fisher") & (summary.budget == 0.1)].iloc[0]
    assert fisher.eval_loss == pytest.approx(2.05)
    assert fisher.eval_loss_ci == pytest.approx(t_interval([2.05, 2.15, 1.95])[1])
    deltas = paired_differences(records, "eval_loss", "uniform", 0.95)
    # the shared per-seed noise cancels in the pairing: a constant 0.05 with zero width
    assert list(deltas.arm) == ["fisher", "fisher"]
    assert np.allclose(deltas.delta, 0.05) and np.allclose(deltas.delta_ci, 0.0)


def test_results_table_shows_ci_and_contrast():
    records = _records().assign(
        examples=10, loss_tokens=100, tokens_trained=200, select_seconds=0.1, train_seconds=1.0
    )
    metrics = ["eval_loss", "examples", "loss_tokens", "tokens_trained"]
    summary = aggregate(
        records, ["arm", "budget"], [*metrics, "select_seconds", "train_seconds"], 0.95
    )
    table = results_table(summary, paired_differences(records, "eval_loss", "uniform", 0.95))
    assert "| fisher | 0.1 | 3 | 10 | 100 | 200 | 2.050 ± 0.248 | 0.050 ± 0.000 |" in table


def test_parse_arm_options_and_errors():
    assert parse_arm("fisher", 1e-3).ridge == 1e-3
    arm = parse_arm("fisher:mean,ridge=10", 1e-3)
    assert (arm.selector, arm.ridge, arm.length_normalised) == ("fisher", 10.0, True)
    with pytest.raises(ValueError, match="names no selector"):
        parse_arm("fishr", 1e-3)
    with pytest.raises(ValueError, match="unknown option"):
        parse_arm("fisher:lambda=3", 1e-3)


def test_config_errors_name_the_key(tmp_path: Path):
    with pytest.raises(StudyConfigError, match="study.budgts"):
        load_study_config(None, [("study.budgts", [0.1])])
    with pytest.raises(StudyConfigError, match="study.seeds"):
        load_study_config(None, [("study.seeds", "many")])
    with pytest.raises(StudyConfigError, match="names no selector"):
        load_study_config(None, [("study.arms", ["fisher", "nope"])])
    with pytest.raises(StudyConfigError, match=r"synthetic.selectors.*'fishr'"):
        load_study_config(None, [("synthetic.selectors", ["fisher", "fishr"])])
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  budgets: [0.5]\nfinetune:\n  epochs: 2\n")
    config = load_study_config(path, [("study.seeds", [7])])
    assert config.study.budgets == [0.5] and config.study.seeds == [7]
    assert config.finetune.epochs == 2 and config.data.limit == 2000  # untouched defaults


def _states(n: int, d: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 12)), d)) for _ in range(n)]


def _features(states: list[np.ndarray], out_dir: Path) -> FeaturesRef:
    pool = pool_from_tokens(states, base_loss=np.ones(len(states), np.float32))
    out_dir.mkdir(parents=True)
    for name in ("factors", "offsets", "pooled", "n_tokens", "base_loss"):
        np.save(out_dir / f"{name}.npy", getattr(pool, name))
    return FeaturesRef(str(out_dir), pool.N, pool.d, int(pool.n_tokens.sum()), 0.0)


def test_length_normalised_divides_each_gram_by_its_tokens(tmp_path: Path):
    states = _states(6, 4, 0)
    pool = load_pool(length_normalised(_features(states, tmp_path / "f"), tmp_path / "n"))
    for i, x in enumerate(states):
        f = pool.factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
        assert np.allclose(f.T @ f, x.T @ x / len(x), atol=1e-5)


def test_selection_profile_against_brute_force():
    states, held = _states(20, 5, 1), _states(7, 5, 2)
    pool = pool_from_tokens(states, base_loss=np.arange(20, dtype=np.float32))
    heldout = pool_from_tokens(held)
    order = np.array([3, 0, 11, 7])
    profile = selection_profile(pool, order, heldout, ridge=0.5)
    v = 0.5 * np.eye(5) + sum(states[i].T @ states[i] for i in order)
    leverage = [np.mean([x @ np.linalg.solve(v, x) for x in h]) for h in held]
    all_tokens = np.concatenate(held)
    assert profile["heldout_leverage_max"] == pytest.approx(max(leverage), rel=1e-4)
    assert profile["heldout_leverage_mean"] == pytest.approx(
        np.mean([x @ np.linalg.solve(v, x) for x in all_tokens]), rel=1e-4
    )
    assert profile["tokens_per_example"] == np.mean([len(states[i]) for i in order])
    norms = [np.sqrt((states[i] ** 2).sum() / len(states[i])) for i in order]
    assert profile["state_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    assert profile["base_loss"] == pytest.approx(np.mean(order))


def test_split_holdout_keeps_the_last_rows_out_of_the_pool(tmp_path: Path):
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "prompt": "p", "response": "r"})
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    pool_path, holdout_path = split_holdout(str(tmp_path / "train.parquet"), 3, tmp_path / "out")
    assert list(pd.read_parquet(pool_path).id) == [f"r{i}" for i in range(7)]
    assert list(pd.read_parquet(holdout_path).id) == ["r7", "r8", "r9"]
    with pytest.raises(ValueError, match="study.holdout=10"):
        split_holdout(str(tmp_path / "train.parquet"), 10, tmp_path / "out")
