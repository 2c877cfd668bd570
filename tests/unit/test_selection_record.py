"""selection.json: one typed record, written with the bytes selections always had."""

import json
from pathlib import Path

import pytest

from steps.selection.record import PriorSummary, SelectionRecord, read_selection, write_selection


def _record(prior: PriorSummary | None) -> SelectionRecord:
    return SelectionRecord(
        selector="fisher",
        budget=2,
        ridge=0.001,
        feature_space="model=abc width=6",
        ids=["ex-3", "ex-1"],
        rows=[3, 1],
        train_ids=["ex-0", "ex-3", "ex-1"],
        prior=prior,
        gains=[1.5, 0.25],
        objective=[-5.0, -4.75],
        final_objective=-4.75,
        loss_tokens=17,
        design_md5="0" * 32,
    )


def test_written_bytes_are_json_dumps_of_the_keys_in_their_historic_order(tmp_path: Path):
    prior = PriorSummary(source="run-1", examples=1, in_pool=1, objective=-6.5)
    path = tmp_path / "selection.json"
    write_selection(path, _record(prior))
    historic = {  # the dict select_subset wrote before the record existed, key for key
        "selector": "fisher",
        "budget": 2,
        "ridge": 0.001,
        "feature_space": "model=abc width=6",
        "ids": ["ex-3", "ex-1"],
        "rows": [3, 1],
        "train_ids": ["ex-0", "ex-3", "ex-1"],
        "prior": {"source": "run-1", "examples": 1, "in_pool": 1, "objective": -6.5},
        "gains": [1.5, 0.25],
        "objective": [-5.0, -4.75],
        "final_objective": -4.75,
        "loss_tokens": 17,
        "design_md5": "0" * 32,
        "budget_kind": "examples",  # added with select.budget_tokens, after the historic keys
        "label_design_md5": None,  # added with fisher-label's warm start, after budget_kind
    }
    assert path.read_text() == json.dumps(historic)
    assert read_selection(path, "s") == _record(prior)


def test_a_cold_record_round_trips_with_prior_null(tmp_path: Path):
    path = tmp_path / "selection.json"
    write_selection(path, _record(None))
    assert json.loads(path.read_text())["prior"] is None
    assert read_selection(path, "s") == _record(None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"--prior='x': no selection file at"),
        ("not json", r"--prior='x': .* is not a selection\.json"),
        ("[1, 2]", r"--prior='x': .* \(not a JSON object\)"),
        ('{"ids": ["a"]}', r"--prior='x': .* lacks feature_space, train_ids, design_md5"),
    ],
)
def test_a_bad_file_is_refused_naming_the_setting(tmp_path: Path, content, message):
    path = tmp_path / "selection.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_selection(path, "--prior='x'")


def test_a_wrongly_typed_field_is_named(tmp_path: Path):
    path = tmp_path / "selection.json"
    bad = {**_record(None).model_dump(), "rows": ["three"], "extra": 1}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"select\.prior='r': .* rows\.0: .*; extra: ") as error:
        read_selection(path, "select.prior='r'")
    assert "not a valid selection.json" in str(error.value)


@pytest.mark.parametrize(
    ("selector", "kind"), [("fisher", "examples"), ("fisher-per-token", "tokens")]
)
def test_a_file_from_before_budget_kinds_reads_the_kind_its_selector_used(
    tmp_path: Path, selector: str, kind: str
):
    path = tmp_path / "selection.json"
    older = _record(None).model_dump(exclude={"budget_kind"}) | {"selector": selector}
    path.write_text(json.dumps(older))
    assert read_selection(path, "s").budget_kind == kind


def test_a_label_design_md5_round_trips_and_older_files_read_none(tmp_path: Path):
    path = tmp_path / "selection.json"
    labelled = _record(None).model_copy(update={"label_design_md5": "1" * 32})
    write_selection(path, labelled)
    assert read_selection(path, "s").label_design_md5 == "1" * 32
    older = _record(None).model_dump(exclude={"label_design_md5"})  # from before label designs
    path.write_text(json.dumps(older))
    assert read_selection(path, "s") == _record(None)
    assert read_selection(path, "s").label_design_md5 is None
