"""Registry: one version per weights, challenger always, champion only when better."""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from steps.evaluation.results import Scored
from steps.registry.register import RegisterConfig, promote, register_model
from tests.conftest import shifted_model_copy

pytestmark = pytest.mark.slow


@pytest.fixture
def own_registry(tmp_path: Path, empty_store):
    """A registry of this test's own; the URIs are process-wide, so later tests get theirs back."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = empty_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def test_versions_aliases_and_promotion(own_registry, tmp_path: Path):
    client = MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config = RegisterConfig(model_name="sift-unit")
    first_dir, second_dir = (
        shifted_model_copy(tmp_path / "m1", 0.0),
        shifted_model_copy(tmp_path / "m2", 0.01),
    )

    first = register_model(first_dir, run_id, config, {"git.sha": "abc"})
    assert first.newly_registered and first.version == "1"
    assert register_model(first_dir, run_id, config, {}).newly_registered is False  # same weights
    assert client.get_model_version("sift-unit", "1").tags["git.sha"] == "abc"

    never_called = lambda uri: pytest.fail("champion should not be re-scored")  # noqa: E731
    assert promote(first, Scored(2.5, "eval-a"), never_called).promoted  # no champion yet

    second = register_model(second_dir, run_id, config, {})
    assert second.version == "2"
    assert str(client.get_model_version_by_alias("sift-unit", "challenger").version) == "2"
    worse = promote(second, Scored(2.6, "eval-a"), never_called)  # same eval data: recorded loss
    assert not worse.promoted and worse.champion_version == "1"

    scored: list[str] = []
    better = promote(
        second, Scored(2.6, "eval-b"), lambda uri: scored.append(uri) or Scored(2.7, "eval-b")
    )
    assert scored == ["models:/sift-unit@champion"]  # new eval data: the champion is re-scored
    assert better.promoted
    assert str(client.get_model_version_by_alias("sift-unit", "champion").version) == "2"


def test_a_first_version_that_loses_its_bases_benchmark_is_not_promoted_under_beat_base(
    own_registry, tmp_path: Path
):
    """gate.first_version=beat_base: with no champion, the first version is measured against
    the base model by the gate's rule. A fine-tune that lowers the loss but loses the gated
    benchmark stays challenger (no champion, the decision recorded); one that wins is promoted;
    the default still promotes a first version whatever its scores."""
    import json

    from steps.evaluation.results import Measured
    from steps.registry.aliases import history
    from steps.registry.gate import GateConfig

    client = MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    never = lambda uri: pytest.fail("no champion to re-score")  # noqa: E731
    gate = GateConfig(metric="arc_easy/acc_norm", first_version="beat_base")

    def scores(loss: float, acc: float) -> Scored:
        return Scored(loss, "eval-a", "plan", bench={"arc_easy/acc_norm": Measured(acc, 0.01)},
                      higher_is_better={"arc_easy/acc_norm": True})  # fmt: skip

    base = scores(1.43, 0.46)
    loser = register_model(shifted_model_copy(tmp_path / "m1", 0.0), run_id,
                           RegisterConfig(model_name="sift-base-gate"), {})  # fmt: skip
    kept = promote(loser, scores(1.11, 0.40), never, gate, base=base)
    assert not kept.promoted and kept.champion_version == "none"
    assert "vs base model's 0.4600" in kept.reason and "does not exceed" in kept.reason
    tags = client.get_model_version("sift-base-gate", loser.version).tags
    assert json.loads(tags["sift.gate"])["against"] == "base model"
    assert [e.moved for e in history(client, "sift-base-gate")] == [False]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("sift-base-gate", "champion")

    winner = register_model(shifted_model_copy(tmp_path / "m2", 0.01), run_id,
                            RegisterConfig(model_name="sift-base-gate"), {})  # fmt: skip
    promoted = promote(winner, scores(1.20, 0.52), never, gate, base=base)
    assert promoted.promoted and promoted.champion_version == winner.version
    assert str(client.get_model_version_by_alias("sift-base-gate", "champion").version) == "2"

    default = register_model(shifted_model_copy(tmp_path / "m3", 0.02), run_id,
                             RegisterConfig(model_name="sift-first-default"), {})  # fmt: skip
    with pytest.raises(ValueError, match="first_version=beat_base: the base model's scores"):
        promote(default, scores(1.11, 0.40), never, gate)  # beat_base without base scores
    assert promote(default, scores(1.11, 0.40), never, base=base).promoted
