"""Warm starts: selection seeded with an earlier selection's design (select_subset's prior)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steps.selection.embed import load_pool
from steps.selection.select import SelectConfig, load_prior, select_subset, selected_ids
from tests.conftest import write_pool_features

SPACE = "model=test width=6"
RIDGE = 1e-3


def _record(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _gram(features, table_path: str, ids: list[str]) -> np.ndarray:
    """Σ FᵀF of the examples with these ids, freshly in float64."""
    pool = load_pool(features)
    row_of = {i: row for row, i in enumerate(pd.read_parquet(table_path).id)}
    rows = [row_of[i] for i in ids]
    f = np.concatenate([pool.factors[pool.offsets[r] : pool.offsets[r + 1]] for r in rows])
    return f.astype(np.float64).T @ f.astype(np.float64)


@pytest.fixture
def first(tmp_path: Path):
    """A pool and a cold-start selection of 8 of its 40 examples, loaded as a prior."""
    features, table_path = write_pool_features(tmp_path)
    config = SelectConfig(budget=8, ridge=RIDGE)
    ref = select_subset(features, table_path, config, tmp_path / "first", space=SPACE)
    prior = load_prior(Path(ref.selection_path), "run-1", "select.prior")
    return features, table_path, ref, prior


def test_a_cold_selection_records_its_design_and_space(first):
    features, table_path, ref, _ = first
    record = _record(ref.selection_path)
    assert record["feature_space"] == SPACE and record["prior"] is None
    assert record["train_ids"] == record["ids"] == selected_ids(ref)
    design = np.load(ref.design_path)
    assert design.dtype == np.float64
    np.testing.assert_allclose(design, _gram(features, table_path, record["ids"]), rtol=1e-9)


def test_warm_start_excludes_the_prior_trains_on_it_and_continues_greedy(first, tmp_path: Path):
    features, table_path, cold, prior = first
    config = SelectConfig(budget=8, ridge=RIDGE)
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
    both = select_subset(
        features, table_path, SelectConfig(budget=16, ridge=RIDGE), tmp_path / "16"
    )
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
    config = SelectConfig(budget=5, ridge=RIDGE)
    warm = select_subset(
        features, str(other_table), config, tmp_path / "warm", space=SPACE, prior=prior
    )
    record = _record(warm.selection_path)
    assert record["prior"]["examples"] == 8 and record["prior"]["in_pool"] == 5
    assert record["train_ids"] == picked[3:] + record["ids"]
    assert not set(record["ids"]) & set(picked[3:])


def test_a_fraction_budget_is_of_the_candidates_left(first, tmp_path: Path):
    features, table_path, _, prior = first
    config = SelectConfig(budget=0.25, ridge=RIDGE)  # of the 32 left
    warm = select_subset(features, table_path, config, tmp_path / "warm", space=SPACE, prior=prior)
    assert warm.examples == 8 and warm.train_examples == 16


def test_a_prior_from_another_feature_space_is_refused(first, tmp_path: Path):
    features, table_path, _, prior = first
    other = "model=other width=6"
    with pytest.raises(ValueError, match=r"select\.prior='run-1'.*model=test.*model=other"):
        select_subset(
            features, table_path, SelectConfig(budget=4), tmp_path / "w", space=other, prior=prior
        )
    assert not (tmp_path / "w").exists()


def test_a_budget_beyond_the_candidates_left_names_the_prior(first, tmp_path: Path):
    features, table_path, _, prior = first
    with pytest.raises(ValueError, match=r"32 candidate examples left: select\.prior='run-1'"):
        select_subset(
            features, table_path, SelectConfig(budget=33), tmp_path / "w", space=SPACE, prior=prior
        )


def test_a_design_of_another_width_is_refused(first, tmp_path: Path):
    *_, prior = first
    features, table_path = write_pool_features(tmp_path / "wide", d=8)
    with pytest.raises(ValueError, match=r"select\.prior='run-1': design\.npy has shape \(6, 6\)"):
        select_subset(
            features, table_path, SelectConfig(budget=4), tmp_path / "w", space=SPACE, prior=prior
        )


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
    np.save(selection.parent / "design.npy", np.eye(6))  # another selection wrote here
    with pytest.raises(ValueError, match=r"--prior='x': .*design\.npy .* overwritten"):
        load_prior(selection, "x", "--prior")
    (selection.parent / "design.npy").unlink()
    with pytest.raises(ValueError, match=r"--prior='x': no design\.npy beside"):
        load_prior(selection, "x", "--prior")
