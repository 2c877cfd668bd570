"""Fine-tuning: full-parameter SFT with transformers' Trainer, loss on response tokens only."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import Trainer, TrainerCallback, TrainingArguments

from steps.modeling import (
    IGNORE_INDEX,
    Encoded,
    ModelConfig,
    encode_examples,
    load_model,
    load_tokenizer,
    pad_batch,
)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(default=3.0, gt=0)
    # Tiny models tolerate (and need) a large learning rate; use ~1e-5–1e-4 for real LLMs.
    learning_rate: float = Field(default=2e-3, gt=0)
    batch_size: int = Field(default=16, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: str = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    # Batches of similar length waste less compute on padding than random batches.
    group_by_length: bool = True
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class ModelRef:
    """A fine-tuned model on disk (safetensors + tokenizer) and how it was made."""

    model_dir: str
    train_loss: float
    steps: int
    tokens: int
    seconds: float
    run_id: str | None  # the MLflow run that trained it (lineage for cached re-runs)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Encoded]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        e = self.examples[index]
        return {"input_ids": e.input_ids, "labels": e.labels}


class MlflowStepLogger(TrainerCallback):
    """Logs Trainer's step metrics to an explicit MLflow run (the active run is thread-local)."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run_id is None or not logs:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in logs.items():
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(self.run_id, f"train/{key}", float(value), step=state.global_step)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at step {state.global_step}; lower "
                "finetune.learning_rate or check the data. No model was saved."
            )


def _collate(pad_id: int):
    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch([Encoded(f["input_ids"], f["labels"]) for f in features], pad_id)

    return collate


def finetune(
    train_path: str,
    selected_ids: list[str],
    model_config: ModelConfig,
    config: FinetuneConfig,
    out_dir: Path,
    device: str,
    precision: str,
    run_id: str | None = None,
) -> ModelRef:
    """Trains the base model on the selected examples and saves it to out_dir."""
    frame = pd.read_parquet(train_path).set_index("id").loc[selected_ids]
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, device)
    examples = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(examples),
        data_collator=_collate(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[StopOnNonFiniteLoss(), MlflowStepLogger(run_id)],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    if not math.isfinite(result.training_loss):
        raise NonFiniteLossError(f"final training loss is {result.training_loss}; model not saved")
    trainer.save_model(str(out_dir))  # safetensors weights + config + tokenizer
    return ModelRef(
        model_dir=str(out_dir),
        train_loss=float(result.training_loss),
        steps=int(result.global_step),
        tokens=int(trainer.state.num_input_tokens_seen),
        seconds=seconds,
        run_id=run_id,
    )


__all__ = ["IGNORE_INDEX", "FinetuneConfig", "ModelRef", "finetune"]
