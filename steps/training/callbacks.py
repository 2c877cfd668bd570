"""Trainer callbacks: per-step metrics to MLflow, and a hard stop on a non-finite loss."""

from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """Raises at the first logged NaN/inf loss, before the step's checkpoint is written."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at step {state.global_step}; lower "
                "finetune.learning_rate or check the data. No model was saved."
            )


class LogLastStep(TrainerCallback):
    """Logs the final step too, so the last loss (and a run shorter than logging_steps) is seen."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class MlflowStepLogger(TrainerCallback):
    """Logs loss, learning rate, tokens/s and (on GPU) peak memory to an explicit MLflow run.

    The run is given by id, not taken from mlflow's active run: that is thread-local, and
    Prefect runs tasks in worker threads. Only the main process of a multi-process run logs.
    tokens/s counts non-padding input tokens of all processes over wall time between logs.
    """

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.last_time = 0.0
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run_id is None or not logs or not state.is_world_process_zero:
            return
        # Here, not at import: the other processes of a multi-process run never log, and
        # importing MLflow cost each of them 2 s of CPU.
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if "loss" in logs and now > self.last_time:
            metrics["tokens_per_second"] = (tokens - self.last_tokens) / (now - self.last_time)
            if torch.cuda.is_available() and args.device.type == "cuda":
                metrics["cuda_max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_time, self.last_tokens = now, tokens
        stamp = int(time.time() * 1000)
        batch = [
            Metric(f"train/{key}", value, stamp, state.global_step)
            for key, value in metrics.items()
            if math.isfinite(value)
        ]
        MlflowClient().log_batch(self.run_id, metrics=batch)  # one round trip per log
