"""The study's pure logic: t-intervals, aggregation, paired contrasts, arms, config errors,
length normalisation, the selection profile against brute force, the tuning split, and the
equal-cost comparison (budget kinds, equal steps, common random numbers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steps.selection.embedding.embed import FeaturesRef, load_pool
from steps.selection.pool import pool_from_tokens
from steps.study.report import (
    aggregate,
    paired_by_kind,
    paired_differences,
    plot_study,
    profile_table,
    results_table,
    t_interval,
)
from steps.study.study import (
    StudyConfigError,
    equal_steps,
    length_normalised,
    load_study_config,
    parse_arm,
    selection_profile,
    split_holdout,
    trial_configs,
)
from steps.training.job import FinetuneConfig
from tests.conftest import REPO


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


def _records(kinds: tuple[str, ...] = ("examples",)) -> pd.DataFrame:
    """fisher is uniform + 0.05 at equal examples and uniform - 0.02 at equal tokens, plus
    noise shared by the arms at each (kind, seed) and different across kinds."""
    rows = []
    for kind, shift in (("examples", 0.05), ("tokens", -0.02)):
        for seed, noise in enumerate([0.0, 0.1, -0.1]):
            noise *= 1 if kind == "examples" else -3
            for arm, arm_shift in (("uniform", 0.0), ("fisher", shift)):
                for budget in (0.1, 0.2):
                    loss = 2 + arm_shift + noise
                    rows.append({"arm": arm, "budget_kind": kind, "budget": budget,
                                 "seed": seed, "eval_loss": loss})  # fmt: skip
    return pd.DataFrame([row for row in rows if row["budget_kind"] in kinds])


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


def test_paired_differences_pair_within_each_budget_kind():
    records = _records(("examples", "tokens"))
    deltas = paired_by_kind(records, "eval_loss", "uniform", 0.95)
    assert sorted(zip(deltas.budget_kind, deltas.budget, strict=True)) == [
        ("examples", 0.1), ("examples", 0.2), ("tokens", 0.1), ("tokens", 0.2)
    ]  # fmt: skip
    by_kind = deltas.set_index("budget_kind")
    # each kind's own noise cancels: pairing across kinds would leave a width
    assert np.allclose(by_kind.loc["examples"].delta, 0.05)
    assert np.allclose(by_kind.loc["tokens"].delta, -0.02)
    assert np.allclose(deltas.delta_ci, 0.0) and (deltas.n == 3).all()


def _summary(records: pd.DataFrame) -> pd.DataFrame:
    profile = {"tokens_per_example": 10.0, "state_norm": 1.0, "base_loss": 5.0, "outlier": 2.0,
               "heldout_leverage_mean": 0.01, "heldout_leverage_max": 0.02}  # fmt: skip
    pool = {f"pool_{k}": v for k, v in profile.items() if not k.startswith("heldout")}
    tokens = records.budget_kind == "tokens"
    records = records.assign(
        examples=np.where(tokens, 6, 10), loss_tokens=100, tokens_trained=200,
        steps=2, select_seconds=0.1, train_seconds=1.0, **profile, **pool,
    )  # fmt: skip
    metrics = ["eval_loss", "examples", "loss_tokens", "tokens_trained", "steps"]
    metrics += ["select_seconds", "train_seconds", *profile, *pool]
    return aggregate(records, ["budget_kind", "arm", "budget"], metrics, 0.95)


def test_results_table_shows_ci_contrast_and_what_was_trained():
    records = _records()
    summary = _summary(records)
    table = results_table(summary, paired_by_kind(records, "eval_loss", "uniform", 0.95))
    assert table.startswith("Equal examples")
    assert "| fisher | 0.1 | 3 | 10 | 100 | 200 | 2 | 2.050 ± 0.248 | 0.050 ± 0.000 |" in table
    assert "Equal tokens" not in table


def test_results_and_profile_tables_and_plot_have_a_section_per_budget_kind(tmp_path: Path):
    records = _records(("examples", "tokens"))
    summary = _summary(records)
    table = results_table(summary, paired_by_kind(records, "eval_loss", "uniform", 0.95))
    examples, tokens = table.split("Equal tokens")
    assert "| fisher | 0.1 | 3 | 10 | 100 | 200 | 2 |" in examples and "-0.020" not in examples
    assert "| fisher | 0.1 | 3 | 6 | 100 | 200 | 2 | 1.980 ± 0.745 | -0.020 ± 0.000 |" in tokens
    profile = profile_table(summary)
    assert profile.index("examples:") < profile.index("tokens:") < profile.index("Pool averages")
    plot_study(summary, 7.0, "study", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    with pytest.raises(StudyConfigError, match=r"study.budget_kinds.*once"):
        load_study_config(None, [("study.budget_kinds", ["tokens", "tokens"])])
    with pytest.raises(StudyConfigError, match="study.budget_kinds"):
        load_study_config(None, [("study.budget_kinds", ["steps"])])
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  budgets: [0.5]\nfinetune:\n  epochs: 2\n")
    config = load_study_config(path, [("study.seeds", [7])])
    assert config.study.budgets == [0.5] and config.study.seeds == [7]
    assert config.finetune.epochs == 2 and config.data.limit == 2000  # untouched defaults


def test_arms_are_checked_against_the_sections_at_load():
    plain = [("study.arms", ["uniform", "fisher-label"]), ("embed.token_weight", "none")]
    with pytest.raises(StudyConfigError, match=r"fisher-label.*embed.token_weight: label"):
        load_study_config(None, plain)
    label = [("study.arms", ["uniform", "fisher-label"])]  # embed's default computes them
    assert load_study_config(None, label).arms()[1].selector == "fisher-label"
    with pytest.raises(StudyConfigError, match=r"fisher-target.*select.target.*sift select"):
        load_study_config(None, [("study.arms", ["uniform", "fisher-target"])])


def test_a_token_budget_study_needs_one_epoch_and_sets_the_steps_itself():
    tokens = ("study.budget_kinds", ["examples", "tokens"])
    with pytest.raises(StudyConfigError, match=r"finetune.epochs=1 \(got 3\)"):
        load_study_config(None, [tokens, ("finetune.epochs", 3)])
    with pytest.raises(StudyConfigError, match=r"finetune.steps=5.*leave finetune.steps unset"):
        load_study_config(None, [tokens, ("finetune.epochs", 1), ("finetune.steps", 5)])
    assert load_study_config(None, [tokens]).study.budget_kinds == ["examples", "tokens"]
    assert load_study_config(None, []).study.budget_kinds == ["examples"]  # as before


def test_equal_steps_are_uniforms_steps_at_the_same_fraction_of_examples():
    batch8 = FinetuneConfig(epochs=1, batch_size=8)
    assert equal_steps(0.1, 1000, 196_000, batch8) == 13  # 100 examples in batches of 8
    assert equal_steps(0.01, 1000, 196_000, batch8) == 2  # 10 examples
    assert equal_steps(19_600, 1000, 196_000, batch8) == 13  # a count: 100 mean-length examples
    assert equal_steps(0.001, 100, 9_000, batch8) == 1  # never below one step
    accumulated = FinetuneConfig(epochs=1, batch_size=4, gradient_accumulation_steps=2)
    assert equal_steps(0.1, 1000, 196_000, accumulated) == 13  # 25 batches, 2 per step


def test_every_arm_at_a_seed_trains_with_that_seed_and_tokens_arms_with_equal_steps():
    tune = [("finetune.epochs", 1), ("finetune.batch_size", 8)]  # a section replaces defaults
    config = load_study_config(None, [("study.budget_kinds", ["examples", "tokens"]), *tune])
    pool = FeaturesRef("unused", examples=1000, dim=64, loss_tokens=196_000, padding_fraction=0)
    fisher, uniform = parse_arm("fisher", 1e-3), parse_arm("uniform", 1e-3)
    for kind in ("examples", "tokens"):
        (fisher_select, fisher_tune), (uniform_select, uniform_tune) = (
            trial_configs(config, arm, kind, 0.1, 4, pool) for arm in (fisher, uniform)
        )
        assert fisher_tune.seed == uniform_tune.seed == 4  # common random numbers
        assert fisher_tune == uniform_tune  # the arms differ only in what they select
        assert (fisher_select.selector, uniform_select.selector) == ("fisher", "uniform")
        assert fisher_select.seed == uniform_select.seed == 4
    examples_select, examples_tune = trial_configs(config, fisher, "examples", 0.1, 4, pool)
    assert (examples_select.budget, examples_select.budget_tokens) == (0.1, None)
    assert examples_tune == config.finetune.model_copy(update={"seed": 4})  # as before
    tokens_select, tokens_tune = trial_configs(config, fisher, "tokens", 0.1, 4, pool)
    assert (tokens_select.budget, tokens_select.budget_tokens) == (None, 0.1)
    assert tokens_tune.steps == 13 and tokens_tune.epochs == 1


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
    assert pool.label_factors is None and not (tmp_path / "n" / "label_factors.npy").exists()


def test_length_normalised_scales_the_label_weighted_factors_too(tmp_path: Path):
    states = _states(6, 4, 3)
    weights = [np.random.default_rng(i).random(len(x)) for i, x in enumerate(states)]
    labelled = pool_from_tokens(states, weights=weights)
    ref = _features(states, tmp_path / "f")
    np.save(tmp_path / "f" / "label_factors.npy", labelled.label_factors)
    normalised = length_normalised(replace(ref, token_weight="label"), tmp_path / "n")
    pool = load_pool(normalised)
    assert pool.label_factors is not None
    for i, (x, w) in enumerate(zip(states, weights, strict=True)):
        f = pool.label_factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
        assert np.allclose(f.T @ f, (x * w[:, None]).T @ x / len(x), atol=1e-5)


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


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/study*.yaml")), ids=lambda p: p.name)
def test_every_study_config_loads(path: Path):
    config = load_study_config(path, [])
    assert config.arms() or config.synthetic.runs > 0
