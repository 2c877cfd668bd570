"""select.prior resolved against a real MLflow store: a run id, the champion, or neither."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.pipeline import _log_selection
from flows.tasks import NO_CHAMPION, RunContext, TimedSelection, prior_task
from steps import tracking
from steps.selection.select import PriorRef, SelectConfig, select_subset
from tests.conftest import write_pool_features
from tests.unit.test_warm_start import write_label_pool_features


@pytest.fixture
def store(tmp_path: Path, empty_store) -> str:
    uri = empty_store(tmp_path / "mlflow.db")
    tracking.use_tracking(uri)
    return uri


def resolve_prior(store: str, prior: str, state_dir: Path) -> tuple[PriorRef | None, str]:
    """The prior task's body (no Prefect flow run around it) for a config naming `prior`."""
    config = load_config(
        None,
        [
            f"tracking.tracking_uri={store}",
            "registry.model_name=sift-prior",
            f"select.prior={prior}",
        ],
    )
    context = RunContext(state_dir, state_dir, device="cpu", precision="fp32", run_id="")
    return prior_task.fn(
        named=config.select.prior, model_name=config.registry.model_name, context=context
    )


def _run_with_selection(tmp_path: Path, files: tuple[str, ...]) -> str:
    """An MLflow run that logged a real selection's files under selection/."""
    features, table_path = write_pool_features(tmp_path / "pool")
    config = SelectConfig(budget=4, selector="fisher")  # the pool has no label factors
    select_subset(features, table_path, config, tmp_path / "s", space="s")
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment_id("prior", tmp_path)).info.run_id
    for name in files:
        client.log_artifact(run_id, str(tmp_path / "s" / name), "selection")
    return run_id


def test_no_prior_and_champion_before_any_champion_are_cold_starts(store, tmp_path, capsys):
    assert resolve_prior(store, "", tmp_path) == (None, "none")
    assert resolve_prior(store, "champion", tmp_path) == (None, NO_CHAMPION)
    assert "has no champion yet" in capsys.readouterr().out
    MlflowClient().create_registered_model("sift-prior")  # registered, nothing promoted
    assert resolve_prior(store, "champion", tmp_path) == (None, NO_CHAMPION)


def test_the_champion_resolves_to_the_run_that_trained_it(store, tmp_path: Path):
    run_id = _run_with_selection(tmp_path, ("selection.json", "design.npy"))
    client = MlflowClient()
    client.create_registered_model("sift-prior")
    version = client.create_model_version(
        "sift-prior", str(tmp_path), run_id=run_id, tags={"mlflow.source_run": run_id}
    )
    client.set_registered_model_alias("sift-prior", "champion", version.version)

    prior, prior_run = resolve_prior(store, "champion", tmp_path / "state")
    assert prior is not None and prior_run == prior.source == run_id
    assert prior.setting == "select.prior"
    assert Path(prior.design_path).parent == Path(prior.selection_path).parent
    assert Path(prior.selection_path).is_relative_to(tmp_path / "state" / "priors" / run_id)
    same, _ = resolve_prior(store, run_id, tmp_path / "state")
    assert same == prior  # by run id: the same files, the same cache key


def test_a_missing_run_or_one_without_a_design_is_named(store, tmp_path: Path):
    with pytest.raises(ValueError, match=r"select\.prior='0123abc': no such MLflow run"):
        resolve_prior(store, "0123abc", tmp_path)
    old = _run_with_selection(tmp_path, ("selection.json",))  # from before designs
    with pytest.raises(ValueError, match=rf"select\.prior='{old}': .* no selection/design\.npy"):
        resolve_prior(store, old, tmp_path)


def test_a_run_whose_selection_json_is_not_a_selection_record_is_named(store, tmp_path: Path):
    run_id = _run_with_selection(tmp_path, ("design.npy",))
    record = json.loads((tmp_path / "s" / "selection.json").read_text())
    bad = tmp_path / "bad" / "selection.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**record, "rows": "all of them"}))
    MlflowClient().log_artifact(run_id, str(bad), "selection")
    with pytest.raises(ValueError, match=rf"select\.prior='{run_id}': .* not a valid .* rows"):
        resolve_prior(store, run_id, tmp_path / "state")


def test_the_pipeline_logs_the_label_design_and_a_later_run_downloads_it(store, tmp_path: Path):
    features, table_path = write_label_pool_features(tmp_path / "pool")
    config = SelectConfig(budget=4, selector="fisher-label")
    ref = select_subset(features, table_path, config, tmp_path / "s", space="s")
    run_id = MlflowClient().create_run(tracking.experiment_id("prior", tmp_path)).info.run_id
    _log_selection(run_id, TimedSelection(ref, 0.0))  # what the pipeline logs

    prior, _ = resolve_prior(store, run_id, tmp_path / "state")
    assert prior is not None and prior.label_design_path is not None
    assert Path(prior.label_design_path).parent == Path(prior.selection_path).parent
    written = json.loads(Path(ref.selection_path).read_text())["label_design_md5"]
    assert prior.label_design_md5 == written


def test_a_run_without_a_label_design_is_still_a_prior_for_fisher(store, tmp_path: Path):
    run_id = _run_with_selection(tmp_path, ("selection.json", "design.npy"))
    prior, _ = resolve_prior(store, run_id, tmp_path / "state")
    assert prior is not None and prior.label_design_path is None
    features, table_path = write_pool_features(tmp_path / "pool2")
    config = SelectConfig(budget=4, selector="fisher")
    warm = select_subset(features, table_path, config, tmp_path / "w", space="s", prior=prior)
    assert warm.train_examples == 8
