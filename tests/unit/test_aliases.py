"""Rolling back replays the audit history as a stack of champions (no MLflow needed)."""

from steps.registry.aliases import AliasEvent, previous_holder


def _event(kind: str, from_version: str | None, to_version: str, moved: bool = True):
    at = "2026-01-01T00:00:00.000000+00:00"
    return AliasEvent(at, "me", kind, "champion", from_version, to_version, "why", moved=moved)


def test_rollback_target_is_the_champion_before_the_current_one():
    events = [_event("auto", None, "1"), _event("auto", "1", "2"), _event("manual", "2", "5")]
    assert previous_holder(events, "champion", "5") == "2"


def test_successive_rollbacks_walk_back_instead_of_toggling():
    events = [_event("auto", None, "1"), _event("auto", "1", "2"), _event("manual", "2", "3")]
    events.append(_event("rollback", "3", "2"))
    assert previous_holder(events, "champion", "2") == "1"  # not 3, which was just undone
    events.append(_event("rollback", "2", "1"))
    assert previous_holder(events, "champion", "1") is None


def test_kept_out_candidates_and_other_aliases_are_not_champions():
    events = [_event("auto", None, "1"), _event("auto", "1", "2", moved=False)]
    events.append(AliasEvent("t", "me", "manual", "staging", None, "4", "why"))
    assert previous_holder(events, "champion", "1") is None


def test_a_champion_moved_outside_sift_rolls_back_to_the_last_recorded_one():
    events = [_event("auto", None, "1"), _event("auto", "1", "2")]
    assert previous_holder(events, "champion", "7") == "2"  # 7 was set in the MLflow UI
    assert previous_holder([], "champion", "7") is None
