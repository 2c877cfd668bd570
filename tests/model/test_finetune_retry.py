"""A Prefect retry of the pipeline's fine-tune task resumes from the failed attempt's checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.pipeline import finetune_task
from steps.modeling import ModelConfig
from steps.selection.select import SelectionRef
from steps.training.finetune import FinetuneConfig, last_checkpoint
from tests.conftest import MODEL_DIR, new_run_id
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


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
        import time

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
    import threading

    train_path, ids = write_train_table(gsm8k_train[:24], tmp_path / "train.parquet")
    (tmp_path / "selection.json").write_text(json.dumps({"ids": ids, "train_ids": ids}))
    selection = SelectionRef(str(tmp_path / "selection.json"), "", "uniform", 24, 0, 0.0, "", 24)
    run_id = new_run_id("finetune-retry")
    config = FinetuneConfig(epochs=4, batch_size=4, logging_steps=1, checkpoint_steps=4)
    out_dir = tmp_path / "model"

    @flow
    def finetune_only():
        return finetune_task(
            train_path, "md5", selection, MODEL, "model-md5",
            config, out_dir, "cpu", "fp32", run_id,
        )  # fmt: skip

    breaker = FailOnceAfterCheckpoint(run_id, out_dir / "checkpoints")
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
