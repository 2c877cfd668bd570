"""A Prefect cache hit whose files were damaged is not used: the task runs again, with a
warning naming the file, and the scores that reach the registry are those of the weights on
disk. Real Prefect, torch, MLflow and the bundled model; the step side (chunks, checkpoints)
is tests/model/test_cache_healing.py."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.tasks import (
    RunContext,
    embed_task,
    finetune_task,
    promote_task,
    register_task,
    score_task,
)
from steps.data.ingest import TableRef, table_ref
from steps.evaluation.evaluate import EvalConfig, evaluate
from steps.evaluation.score import scored
from steps.evaluation.suites import plan_benchmarks
from steps.hashing import file_md5
from steps.modeling import ModelConfig, ModelSource, model_source, trained_source
from steps.registry.aliases import EVAL_LOSS
from steps.registry.register import WEIGHTS_TAG, RegisterConfig
from steps.selection.embedding.embed import FILES, EmbedConfig
from steps.selection.record import write_selection
from steps.selection.select import SelectionRef
from steps.training.finetune import FinetuneConfig
from tests.conftest import MODEL_DIR, REPO, shifted_model_copy
from tests.flows.test_finetune_retry import _uniform_record

# one_torch_thread is a fixture: imported here, pytest finds it in this module.
from tests.model.conftest import one_torch_thread, write_train_table  # noqa: F401

MODEL = ModelConfig(name=str(MODEL_DIR))
EVAL = EvalConfig(suite="none", generations=0)  # the held-out loss only: seconds
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_torch_thread")]


def _notices(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]


@pytest.fixture
def tables(gsm8k_train, gsm8k_test, tmp_path: Path) -> tuple[TableRef, TableRef]:
    train, _ = write_train_table(gsm8k_train[:16], tmp_path / "train.parquet")
    held_out, _ = write_train_table(gsm8k_test[:8], tmp_path / "eval.parquet")
    return table_ref(Path(train)), table_ref(Path(held_out))


@pytest.fixture
def context(tmp_path: Path) -> RunContext:
    """A run of its own, in an experiment whose artifacts (the registered model) stay under
    tmp_path: MLflow's default is ./mlruns of the working directory."""
    client = MlflowClient()
    experiment = client.create_experiment(
        f"cache-healing-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment).info.run_id
    return RunContext(tmp_path, tmp_path / "state", "cpu", "fp32", run_id)


def test_a_cached_pool_whose_npy_was_damaged_is_merged_again_from_its_chunks(
    tables, context: RunContext, caplog
):
    @flow
    def embed_only():
        return embed_task(table=tables[0], model=model_source(MODEL),
                          config=EmbedConfig(chunk_examples=8), context=context)  # fmt: skip

    first = embed_only()
    folder = Path(first.features_dir)
    before = {name: (folder / f"{name}.npy").read_bytes() for name in FILES}
    factors = folder / "factors.npy"
    factors.write_bytes(factors.read_bytes()[:1000])  # truncated

    with caplog.at_level(logging.WARNING):
        again = embed_only()

    notices = _notices(caplog, factors)
    assert len(notices) == 1 and "running it again" in notices[0], caplog.text
    assert again.features_dir == first.features_dir
    assert {name: (folder / f"{name}.npy").read_bytes() for name in FILES} == before


def test_scores_of_a_model_folder_are_those_of_the_weights_in_it_now(
    tables, context: RunContext, tmp_path: Path
):
    """A fine-tuned folder keeps its name when its weights change (retrained, replaced): a
    cached score of the old weights is not a score of the new ones."""
    folder = tmp_path / "models" / "0123456789abcdef"
    shutil.copytree(MODEL_DIR, folder)
    trained = trained_source(MODEL, str(folder))
    plan = plan_benchmarks(EVAL, REPO)

    @flow
    def score_only():
        return score_task(model=trained, role="challenger", label="challenger",
                          table=tables[1], plan=plan, config=EVAL, context=context)  # fmt: skip

    first = score_only()
    shifted = shifted_model_copy(tmp_path / "shifted", 0.5)
    shutil.copy(Path(shifted) / "model.safetensors", folder / "model.safetensors")
    again = score_only()

    assert first.evaluation is not None and again.evaluation is not None
    assert again.evaluation.loss != pytest.approx(first.evaluation.loss, abs=1e-3)
    assert again.weights_md5 == file_md5(folder / "model.safetensors") != first.weights_md5


def test_damaged_cached_weights_are_trained_again_and_registered_with_their_own_scores(
    tables, context: RunContext, tmp_path: Path, caplog
):
    """The pipeline's chain finetune → score → register → promote (flows/pipeline.py), run,
    then run again after garbage and then another model's (readable) weights were written
    over the cached model.safetensors."""
    train, held_out = tables
    ids = [f"gsm8k-{i}" for i in range(train.rows)]
    selection_path = tmp_path / "selection.json"
    write_selection(selection_path, _uniform_record(ids))
    selection = SelectionRef(str(selection_path), "", "uniform", len(ids), 0, 0.0, "", len(ids))
    base = ModelSource(MODEL, "model-md5")
    finetune_config = FinetuneConfig(epochs=1, batch_size=4, checkpoint_steps=0)
    registry = RegisterConfig(model_name="sift-cache-healing")
    plan = plan_benchmarks(EVAL, REPO)

    @flow
    def train_score_register():
        tuned = finetune_task(table=train, selection=selection, model=base,
                              config=finetune_config, context=context)  # fmt: skip
        scoring = score_task(model=trained_source(MODEL, tuned.model_dir), role="challenger",
                             label="challenger", table=held_out, plan=plan, config=EVAL,
                             context=context)  # fmt: skip
        version = register_task(model_dir=tuned.model_dir, config=registry, tags={},
                                linked_metrics=(), context=context)  # fmt: skip
        promote_task(version=version, scores=scored(scoring, held_out.md5), champion=None,
                     eval_table=held_out, plan=plan, model=MODEL, config=EVAL,
                     registry=registry, context=context)  # fmt: skip
        return tuned, scoring, version

    def check_registered(model_dir: str, scoring, version) -> None:
        on_disk = file_md5(Path(model_dir) / "model.safetensors")
        tags = MlflowClient().get_model_version(version.name, version.version).tags
        assert tags[WEIGHTS_TAG] == on_disk == scoring.weights_md5
        measured = evaluate(trained_source(MODEL, model_dir), held_out.path, EVAL, "cpu", "fp32")
        assert float(tags[EVAL_LOSS]) == pytest.approx(measured.loss, abs=1e-6)

    tuned, scoring, version = train_score_register()
    check_registered(tuned.model_dir, scoring, version)
    weights = Path(tuned.model_dir) / "model.safetensors"
    foreign = Path(shifted_model_copy(tmp_path / "foreign", 0.5)) / "model.safetensors"

    for damage in ("garbage", "foreign"):
        if damage == "garbage":  # what made register fail with 'header too large'
            weights.write_bytes(os.urandom(4096))
        else:  # readable, so the old scores were registered with these weights
            shutil.copy(foreign, weights)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            tuned, scoring, version = train_score_register()
        notices = _notices(caplog, weights)
        assert len(notices) == 1 and "running it again" in notices[0], (damage, caplog.text)
        assert "\n" not in notices[0]
        check_registered(tuned.model_dir, scoring, version)
