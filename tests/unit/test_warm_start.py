"""Warm starts: selection seeded with an earlier selection's design (select_subset's prior)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steps.selection.embedding.embed import FILES, LABEL_FILES, FeaturesRef, load_pool
from steps.selection.pool import pool_from_tokens
from steps.selection.select import SelectConfig, load_prior, select_subset, selected_ids
from tests.conftest import write_pool_features

SPACE = "model=test width=6"
RIDGE = 1e-3
FISHER = {"selector": "fisher", "ridge": RIDGE}
LABEL = {"selector": "fisher-label", "ridge": RIDGE}


def _record(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _gram(features, table_path: str, ids: list[str], *, label: bool = False) -> np.ndarray:
    """Σ FᵀF (label=True: of the label factors) of the examples with these ids, in float64."""
    pool = load_pool(features)
    factors = pool.label_factors if label else pool.factors
    assert factors is not None
    row_of = {i: row for row, i in enumerate(pd.read_parquet(table_path).id)}
    rows = [row_of[i] for i in ids]
    f = np.concatenate([factors[pool.offsets[r] : pool.offsets[r + 1]] for r in rows])
    return f.astype(np.float64).T @ f.astype(np.float64)


def write_label_pool_features(out_dir: Path, n: int = 40, d: int = 6, seed: int = 0):
    """write_pool_features with label factors too, as embed.token_weight=label leaves it."""
    rng = np.random.default_rng(seed)
    states = [rng.standard_normal((int(t), d)) for t in rng.integers(1, 3 * d, size=n)]
    weights = [2 * rng.random(len(x)) ** 3 for x in states]  # w = ||p - e_y||^2 is in [0, 2]
    pool = pool_from_tokens(states, base_loss=rng.random(n).astype(np.float32), weights=weights)
    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True)
    for name in FILES + LABEL_FILES:
        np.save(features_dir / f"{name}.npy", getattr(pool, name))
    table_path = out_dir / "pool.parquet"
    pd.DataFrame({"id": [f"ex-{i}" for i in range(n)]}).to_parquet(table_path)
    tokens = int(pool.n_tokens.sum())
    ref = FeaturesRef(str(features_dir), n, d, tokens, 0.0, hidden_size=d, token_weight="label")
    return ref, str(table_path)


@pytest.fixture
def first(tmp_path: Path):
    """A pool and a cold-start selection of 8 of its 40 examples, loaded as a prior."""
    return _cold_prior(*write_pool_features(tmp_path), SelectConfig(budget=8, **FISHER), tmp_path)


def _cold_prior(features: FeaturesRef, table_path: str, config: SelectConfig, tmp_path: Path):
    """A cold selection of the pool with `config`, loaded back as a prior."""
    ref = select_subset(features, table_path, config, tmp_path / "first", space=SPACE)
    prior = load_prior(Path(ref.selection_path), "run-1", "select.prior")
    return features, table_path, ref, prior


def test_a_cold_selection_records_its_design_and_space(first):
    features, table_path, ref, _ = first
    record = _record(ref.selection_path)
    assert record["feature_space"] == SPACE and record["prior"] is None
    assert record["label_design_md5"] is None and ref.label_design_path is None  # no labels
    assert not (Path(ref.design_path).parent / "label_design.npy").exists()
    assert record["train_ids"] == record["ids"] == selected_ids(ref)
    design = np.load(ref.design_path)
    assert design.dtype == np.float64
    np.testing.assert_allclose(design, _gram(features, table_path, record["ids"]), rtol=1e-9)


def test_warm_start_excludes_the_prior_trains_on_it_and_continues_greedy(first, tmp_path: Path):
    features, table_path, cold, prior = first
    config = SelectConfig(budget=8, **FISHER)
    warm = select_subset(features, table_path, config, tmp_path / "warm", space=SPACE, prior=prior)
    before, after = _record(cold.selection_path), _record(warm.selection_path)

    assert not set(after["ids"]) & set(before["ids"])  # never re-picked
    assert after["train_ids"] == before["ids"] + after["ids"] == selected_ids(warm)
    assert warm.examples == 8 and warm.train_examples == 16
    v0 = np.load(cold.design_path)
    _, start = np.linalg.slogdet(RIDGE * np.eye(6) + v0)
    assert after["prior"] == {
        "source": "run-1",
        "examples": 8,
        "in_pool": 8,
        "objective": pytest.approx(start, rel=1e-12),
    }
    assert after["objective"][0] - after["gains"][0] == pytest.approx(start, rel=1e-9)
    expected = _gram(features, table_path, after["train_ids"])
    np.testing.assert_allclose(np.load(warm.design_path), expected, rtol=1e-9)

    # Greedy is sequential: 8 then 8 more from the first 8's design is greedy for 16.
    both = select_subset(features, table_path, SelectConfig(budget=16, **FISHER), tmp_path / "16")
    at_once = _record(both.selection_path)
    assert at_once["ids"] == after["train_ids"]
    np.testing.assert_allclose(after["objective"], at_once["objective"][8:], rtol=1e-9)


def test_prior_examples_outside_the_pool_stay_in_the_design_only(first, tmp_path: Path):
    features, table_path, cold, prior = first
    picked = _record(cold.selection_path)["ids"]
    frame = pd.read_parquet(table_path)
    renamed = set(picked[:3])  # these three are not in the new pool (by id)
    frame["id"] = [f"new-{i}" if i in renamed else i for i in frame.id]
    other_table = tmp_path / "other.parquet"
    frame.to_parquet(other_table)
    config = SelectConfig(budget=5, **FISHER)
    warm = select_subset(
        features, str(other_table), config, tmp_path / "warm", space=SPACE, prior=prior
    )
    record = _record(warm.selection_path)
    assert record["prior"]["examples"] == 8 and record["prior"]["in_pool"] == 5
    assert record["train_ids"] == picked[3:] + record["ids"]
    assert not set(record["ids"]) & set(picked[3:])


def test_a_fraction_budget_is_of_the_candidates_left(first, tmp_path: Path):
    features, table_path, _, prior = first
    config = SelectConfig(budget=0.25, **FISHER)  # of the 32 left
    warm = select_subset(features, table_path, config, tmp_path / "warm", space=SPACE, prior=prior)
    assert warm.examples == 8 and warm.train_examples == 16


def test_a_prior_from_another_feature_space_is_refused(first, tmp_path: Path):
    features, table_path, _, prior = first
    other = "model=other width=6"
    with pytest.raises(ValueError, match=r"select\.prior='run-1'.*model=test.*model=other"):
        config = SelectConfig(budget=4, **FISHER)
        select_subset(features, table_path, config, tmp_path / "w", space=other, prior=prior)
    assert not (tmp_path / "w").exists()


def test_a_budget_beyond_the_candidates_left_names_the_prior(first, tmp_path: Path):
    features, table_path, _, prior = first
    with pytest.raises(ValueError, match=r"32 candidate examples left: select\.prior='run-1'"):
        config = SelectConfig(budget=33, **FISHER)
        select_subset(features, table_path, config, tmp_path / "w", space=SPACE, prior=prior)


def test_a_design_of_another_width_is_refused(first, tmp_path: Path):
    *_, prior = first
    features, table_path = write_pool_features(tmp_path / "wide", d=8)
    with pytest.raises(ValueError, match=r"select\.prior='run-1': design\.npy has shape \(6, 6\)"):
        config = SelectConfig(budget=4, **FISHER)
        select_subset(features, table_path, config, tmp_path / "w", space=SPACE, prior=prior)


def test_load_prior_names_the_setting_for_each_problem(first, tmp_path: Path):
    _, _, ref, _ = first
    selection = Path(ref.selection_path)
    with pytest.raises(ValueError, match=r"--prior='x': no selection file"):
        load_prior(tmp_path / "missing.json", "x", "--prior")
    old = tmp_path / "old" / "selection.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"ids": ["ex-1"]}))  # a selection from before designs
    with pytest.raises(ValueError, match=r"--prior='x': .* lacks feature_space, train_ids"):
        load_prior(old, "x", "--prior")
    _overwritten_then_missing(selection, "design.npy")


@pytest.fixture
def label_first(tmp_path: Path):
    """A pool with label factors and a cold fisher-label selection of 8 of its 40, as a prior."""
    label_pool = write_label_pool_features(tmp_path)
    return _cold_prior(*label_pool, SelectConfig(budget=8, **LABEL), tmp_path)


@pytest.mark.parametrize("selector", ["fisher-label", "fisher", "uniform"])
def test_a_selection_on_a_label_pool_writes_the_label_gram_of_its_picks(
    tmp_path: Path, selector: str
):
    features, table_path = write_label_pool_features(tmp_path)
    config = SelectConfig(budget=8, selector=selector, ridge=RIDGE)
    ref = select_subset(features, table_path, config, tmp_path / "s", space=SPACE)
    record = _record(ref.selection_path)
    assert ref.label_design_path == str(tmp_path / "s" / "label_design.npy")
    label_design = np.load(ref.label_design_path)
    assert label_design.dtype == np.float64
    expected = _gram(features, table_path, record["ids"], label=True)
    np.testing.assert_allclose(label_design, expected, rtol=1e-9)
    plain = _gram(features, table_path, record["ids"])
    assert not np.allclose(label_design, plain)  # the weights moved it: not design.npy again
    prior = load_prior(Path(ref.selection_path), "run-1", "select.prior")
    assert prior.label_design_path == ref.label_design_path
    assert prior.label_design_md5 == record["label_design_md5"]


def test_fisher_label_8_then_8_warm_started_equal_16_cold(label_first, tmp_path: Path):
    features, table_path, cold, prior = label_first
    config = SelectConfig(budget=8, **LABEL)
    warm = select_subset(features, table_path, config, tmp_path / "warm", space=SPACE, prior=prior)
    after = _record(warm.selection_path)
    v0 = np.load(cold.design_path)
    _, start = np.linalg.slogdet(RIDGE * np.eye(6) + v0)  # scored on the plain prior
    assert after["prior"]["objective"] == pytest.approx(start, rel=1e-12)
    assert after["objective"][0] - after["gains"][0] == pytest.approx(start, rel=1e-9)
    # Both designs carry the prior's examples forward: the next warm start chains.
    ids = after["train_ids"]
    np.testing.assert_allclose(np.load(warm.design_path), _gram(features, table_path, ids))
    assert warm.label_design_path is not None
    expected_label = _gram(features, table_path, ids, label=True)
    np.testing.assert_allclose(np.load(warm.label_design_path), expected_label, rtol=1e-9)

    both = select_subset(features, table_path, SelectConfig(budget=16, **LABEL), tmp_path / "16")
    at_once = _record(both.selection_path)
    assert at_once["ids"] == after["train_ids"]
    np.testing.assert_allclose(after["objective"], at_once["objective"][8:], rtol=1e-9)


def test_fisher_label_from_a_prior_without_a_label_design_names_the_prior(tmp_path: Path):
    features, table_path = write_label_pool_features(tmp_path)
    plain = dataclasses.replace(features, token_weight="none")  # embedded without labels
    config = SelectConfig(budget=8, **FISHER)
    cold = select_subset(plain, table_path, config, tmp_path / "first", space=SPACE)
    prior = load_prior(Path(cold.selection_path), "run-1", "select.prior")
    assert prior.label_design_path is None and prior.label_design_md5 is None
    message = (
        r"select\.prior='run-1': select\.selector=fisher-label .* no label_design\.npy .*"
        r"embed\.token_weight=label.*: use select\.selector=fisher .* re-run the prior"
    )
    label = SelectConfig(budget=4, **LABEL)
    with pytest.raises(ValueError, match=message):
        select_subset(features, table_path, label, tmp_path / "w", space=SPACE, prior=prior)
    assert not (tmp_path / "w").exists()  # refused before selecting
    # fisher warm-starts from it as ever, and writes no label design it could not complete
    config = SelectConfig(budget=4, **FISHER)
    warm = select_subset(features, table_path, config, tmp_path / "f", space=SPACE, prior=prior)
    assert warm.label_design_path is None
    assert _record(warm.selection_path)["label_design_md5"] is None


def test_load_prior_checks_the_label_design_it_records(label_first, tmp_path: Path):
    *_, ref, _ = label_first
    _overwritten_then_missing(Path(ref.selection_path), "label_design.npy")


def _overwritten_then_missing(selection: Path, name: str) -> None:
    """load_prior refuses the design file `name` once another selection overwrote it, and
    once it is gone, naming the setting and the file."""
    escaped = name.replace(".", r"\.")
    np.save(selection.parent / name, np.eye(6))  # another selection wrote here
    with pytest.raises(ValueError, match=rf"--prior='x': .*{escaped} .* overwritten"):
        load_prior(selection, "x", "--prior")
    (selection.parent / name).unlink()
    with pytest.raises(ValueError, match=rf"--prior='x': no {escaped} beside"):
        load_prior(selection, "x", "--prior")
