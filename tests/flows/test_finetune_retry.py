"""A Prefect retry of the pipeline's fine-tune task resumes from the failed attempt's checkpoint."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.tasks import FINETUNE, RunContext, finetune_task, work_dir
from steps.data.ingest import TableRef
from steps.modeling import ModelConfig, ModelSource
from steps.selection.record import SelectionRecord, write_selection
from steps.selection.select import SelectionRef
from steps.training.finetune import FinetuneConfig, last_checkpoint
from tests.conftest import MODEL_DIR, new_run_id

# one_torch_thread is a fixture: imported here, pytest finds it in this module.
from tests.model.conftest import one_torch_thread, write_train_table  # noqa: F401

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _uniform_record(ids: list[str]) -> SelectionRecord:
    """A selection.json that trains on all of `ids` (what the task reads: train_ids)."""
    return SelectionRecord(
        selector="uniform",
        budget=len(ids),
        ridge=0.0,
        feature_space="",
        ids=ids,
        rows=list(range(len(ids))),
        train_ids=ids,
        prior=None,
        gains=[0.0] * len(ids),
        objective=[0.0] * len(ids),
        final_objective=0.0,
        loss_tokens=0,
        design_md5="",
    )


class FailOnceAfterCheckpoint(logging.Handler):
    """Breaks the first attempt for real: once a checkpoint exists, the MLflow run the task logs
    to is deleted, so its next metric write fails; when Prefect logs the retry, the run is
    restored (handlers run in the emitting thread, so this happens before the retry starts)."""

    def __init__(self, run_id: str, checkpoint_dir: Path):
        super().__init__()
        self.run_id, self.checkpoint_dir = run_id, checkpoint_dir
        self.client = MlflowClient()
        self.deleted_at: int | None = None
        self.retried = False

    def checkpoint_watcher(self) -> None:
        while self.deleted_at is None:
            found = last_checkpoint(self.checkpoint_dir)
            if found is not None:
                self.client.delete_run(self.run_id)
                self.deleted_at = int(found.name.split("-")[1])
            time.sleep(0.01)

    def emit(self, record: logging.LogRecord) -> None:
        if "Retry 1/1" in record.getMessage() and not self.retried:
            self.retried = True
            self.client.restore_run(self.run_id)


def test_a_retried_finetune_task_resumes(prefect_harness, gsm8k_train, tmp_path: Path):
    train_path, ids = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    selection_path = tmp_path / "selection.json"
    write_selection(selection_path, _uniform_record(ids))
    selection = SelectionRef(str(selection_path), "", "uniform", 24, 0, 0.0, "", 24)
    table = TableRef(train_path, 24, "md5")
    model = ModelSource(MODEL, "model-md5")
    context = RunContext(tmp_path, tmp_path / "state", "cpu", "fp32", new_run_id("finetune-retry"))
    config = FinetuneConfig(epochs=4, batch_size=4, logging_steps=1, checkpoint_steps=4)
    # the folder the task derives from its inputs, where the first attempt leaves checkpoints
    out_dir = work_dir(context, "models", FINETUNE, table.md5, selection, model, config)

    @flow
    def finetune_only():
        return finetune_task(
            table=table, selection=selection, model=model, config=config, context=context
        )

    breaker = FailOnceAfterCheckpoint(context.run_id, out_dir / "checkpoints")
    watcher = threading.Thread(target=breaker.checkpoint_watcher, daemon=True)
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.setLevel(logging.INFO)  # the retry notice is INFO; the test environment says WARNING
    logger.addHandler(breaker)
    try:
        watcher.start()
        ref = finetune_only()
    finally:
        logger.removeHandler(breaker)
        logger.setLevel(level)
    assert breaker.retried, "the first attempt did not fail"
    assert ref.resumed_from_step >= 4 and ref.resumed_from_step == breaker.deleted_at
    assert ref.steps == 24
    assert (out_dir / "model.safetensors").is_file()
