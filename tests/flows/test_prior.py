"""select.prior resolved against a real MLflow store: a run id, the champion, or neither."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.pipeline import NO_CHAMPION
from flows.pipeline import resolve_prior as prior_task
from steps import tracking
from steps.selection.select import SelectConfig, select_subset
from tests.conftest import write_pool_features

resolve_prior = prior_task.fn  # the step's body, without a Prefect flow run around it


@pytest.fixture
def store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_tracking(uri)
    return uri


def _config(store: str, prior: str):
    return load_config(
        None,
        [
            f"tracking.tracking_uri={store}",
            "registry.model_name=sift-prior",
            f"select.prior={prior}",
        ],
    )


def _run_with_selection(tmp_path: Path, files: tuple[str, ...]) -> str:
    """An MLflow run that logged a real selection's files under selection/."""
    features, table_path = write_pool_features(tmp_path / "pool")
    select_subset(features, table_path, SelectConfig(budget=4), tmp_path / "s", space="s")
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment_id("prior", tmp_path)).info.run_id
    for name in files:
        client.log_artifact(run_id, str(tmp_path / "s" / name), "selection")
    return run_id


def test_no_prior_and_champion_before_any_champion_are_cold_starts(store, tmp_path, capsys):
    assert resolve_prior(_config(store, ""), tmp_path) == (None, "none")
    assert resolve_prior(_config(store, "champion"), tmp_path) == (None, NO_CHAMPION)
    assert "has no champion yet" in capsys.readouterr().out
    MlflowClient().create_registered_model("sift-prior")  # registered, nothing promoted
    assert resolve_prior(_config(store, "champion"), tmp_path) == (None, NO_CHAMPION)


def test_the_champion_resolves_to_the_run_that_trained_it(store, tmp_path: Path):
    run_id = _run_with_selection(tmp_path, ("selection.json", "design.npy"))
    client = MlflowClient()
    client.create_registered_model("sift-prior")
    version = client.create_model_version(
        "sift-prior", str(tmp_path), run_id=run_id, tags={"mlflow.source_run": run_id}
    )
    client.set_registered_model_alias("sift-prior", "champion", version.version)

    prior, prior_run = resolve_prior(_config(store, "champion"), tmp_path / "state")
    assert prior is not None and prior_run == prior.source == run_id
    assert prior.setting == "select.prior"
    assert Path(prior.design_path).parent == Path(prior.selection_path).parent
    assert Path(prior.selection_path).is_relative_to(tmp_path / "state" / "priors" / run_id)
    same, _ = resolve_prior(_config(store, run_id), tmp_path / "state")
    assert same == prior  # by run id: the same files, the same cache key


def test_a_missing_run_or_one_without_a_design_is_named(store, tmp_path: Path):
    with pytest.raises(ValueError, match=r"select\.prior='0123abc': no such MLflow run"):
        resolve_prior(_config(store, "0123abc"), tmp_path)
    old = _run_with_selection(tmp_path, ("selection.json",))  # from before designs
    with pytest.raises(ValueError, match=rf"select\.prior='{old}': .* no selection/design\.npy"):
        resolve_prior(_config(store, old), tmp_path)
