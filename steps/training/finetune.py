"""Fine-tuning: SFT with transformers' Trainer, loss on response tokens only.

Full fine-tuning or LoRA (peft) by config; checkpoints every `checkpoint_steps` into
`out_dir/checkpoints`, and a re-run with the same out_dir (the flow keys it on the inputs)
resumes from the newest complete one: weights, optimizer, scheduler, RNG and data order.
With `num_processes > 1` the same recipe runs under `accelerate launch` (steps/training/launch.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    encode_examples,
    load_model,
    load_tokenizer,
)
from steps.training import launch
from steps.training.batching import EpochSampler, PaddingCollator, TokenDataset
from steps.training.callbacks import (
    LogLastStep,
    MlflowStepLogger,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
)

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # under out_dir; deleted once the final model is saved


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(default=3.0, gt=0)
    # Tiny models tolerate (and need) a large learning rate; use ~1e-5–1e-4 for real LLMs
    # (LoRA: ~1e-4–1e-3).
    learning_rate: float = Field(default=2e-3, gt=0)
    batch_size: int = Field(default=16, gt=0)  # per process
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: str = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    # Batches of similar length waste less compute on padding than random batches.
    group_by_length: bool = True
    # Recompute activations in the backward pass: ~30% slower, far less activation memory.
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 0
    # full: every weight trains. lora: low-rank adapters only (less memory, smaller
    # optimizer state), merged into the weights before saving, so the saved model is a
    # plain one that evaluate and register load like a full fine-tune.
    method: Literal["full", "lora"] = "full"
    lora_r: int = Field(default=16, gt=0)
    lora_alpha: int = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    # "all-linear" = every linear layer but the output head (peft's shorthand).
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    # A checkpoint (weights, optimizer, scheduler, RNG, step) every N optimizer steps, for
    # resuming after a crash; 0 = none. Frequent saves cost time on big models.
    checkpoint_steps: int = Field(default=50, ge=0)
    checkpoints_kept: int = Field(default=2, gt=0)
    # > 1: data-parallel training in that many processes via `accelerate launch` (GPUs: one
    # per process; CPU: gloo). Batch size is per process.
    num_processes: int = Field(default=1, gt=0)
    # Shard parameters, gradients and optimizer state over the processes (FSDP) for models
    # that do not fit one GPU; plain DDP replicates the model in each process.
    fsdp: bool = False
    # An `accelerate config` file for clusters (machines, ranks, main address, FSDP options);
    # it overrides the launch flags above except num_processes.
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> FinetuneConfig:
        if self.fsdp and self.num_processes < 2:
            raise ValueError("finetune.fsdp needs finetune.num_processes > 1")
        if self.fsdp and self.method == "lora":
            raise ValueError("finetune.fsdp with finetune.method 'lora' is not supported; use DDP")
        if self.accelerate_config and self.num_processes < 2:
            raise ValueError("finetune.accelerate_config needs finetune.num_processes > 1")
        return self


@dataclass(frozen=True)
class ModelRef:
    """A fine-tuned model on disk (safetensors + tokenizer) and how it was made."""

    model_dir: str
    train_loss: float  # mean over all steps, including those before a resume
    final_loss: float  # the last logged loss
    steps: int
    tokens: int  # non-padding input tokens, all processes, this call only
    seconds: float  # wall time of the training loop in this call
    padding_fraction: float  # share of computed positions that were padding (this call)
    resumed_from_step: int  # 0: trained from scratch
    processes: int  # data-parallel world size
    run_id: str | None  # the MLflow run that trained it (lineage for cached re-runs)


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
    """Trains the base model on the selected examples and saves it to out_dir.

    Resumes from out_dir/checkpoints when an earlier call with the same out_dir was killed.
    """
    if config.num_processes == 1:
        return train(
            train_path, selected_ids, model_config, config, out_dir, device, precision, run_id
        )
    spec = {
        "train_path": str(train_path),
        "selected_ids": list(selected_ids),
        "model_config": model_config.model_dump(),
        "config": config.model_dump(),
        "out_dir": str(out_dir),
        "device": device,
        "precision": precision,
        "run_id": run_id,
    }
    result = launch.run_workers(
        spec, Path(out_dir) / "launch", config.num_processes, device, config.accelerate_config
    )
    return ModelRef(**result)


def train_from_spec(spec: dict[str, Any]) -> ModelRef:
    """The worker side of steps/training/launch.py: the same call as finetune(), from JSON."""
    return train(
        spec["train_path"],
        spec["selected_ids"],
        ModelConfig.model_validate(spec["model_config"]),
        FinetuneConfig.model_validate(spec["config"]),
        Path(spec["out_dir"]),
        spec["device"],
        spec["precision"],
        spec["run_id"],
    )


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint. Trainer writes trainer_state.json last, so a folder
    without a readable one was cut off mid-save (it is overwritten when training gets there)."""
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name[11:].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name[11:]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


class SiftTrainer(Trainer):
    """Trainer with a sampler whose order depends only on (seed, epoch): exact resumes."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        assert isinstance(dataset, TokenDataset), "SiftTrainer trains on a TokenDataset"
        return EpochSampler(
            [len(e.input_ids) for e in dataset.examples],
            self.args.per_device_train_batch_size,
            self.args.seed,
            self.args.train_sampling_strategy == "group_by_length",
        )


def train(
    train_path: str,
    selected_ids: list[str],
    model_config: ModelConfig,
    config: FinetuneConfig,
    out_dir: Path,
    device: str,
    precision: str,
    run_id: str | None = None,
) -> ModelRef:
    """The recipe in this process (one of several under accelerate launch)."""
    out_dir = Path(out_dir)
    frame = pd.read_parquet(train_path).set_index("id").loc[selected_ids]
    tokenizer = load_tokenizer(model_config)
    model = _prepare_model(load_model(model_config, device), config)
    examples = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    collator = PaddingCollator(tokenizer.pad_token_id)
    trainer = SiftTrainer(
        model=model,
        args=_training_arguments(config, out_dir / CHECKPOINTS, device, precision),
        train_dataset=TokenDataset(examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[LogLastStep(), StopOnNonFiniteLoss(), MlflowStepLogger(run_id)],
    )
    resume = last_checkpoint(out_dir / CHECKPOINTS)
    resumed_from_step = int(resume.name[11:]) if resume else 0
    if resume is not None:
        log.warning("finetune: resuming from %s (global step %d)", resume, resumed_from_step)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    train_loss, final_loss = _whole_run_losses(trainer.state.log_history)
    if not (math.isfinite(result.training_loss) and math.isfinite(train_loss)):
        raise NonFiniteLossError(f"final training loss is {train_loss}; model not saved")
    _save_final(trainer, tokenizer, config, out_dir)
    return ModelRef(
        model_dir=str(out_dir),
        train_loss=train_loss,
        final_loss=final_loss,
        steps=int(result.global_step),
        tokens=int(trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen),
        seconds=seconds,
        padding_fraction=collator.padding_fraction,
        resumed_from_step=resumed_from_step,
        processes=trainer.args.world_size,
        run_id=run_id,
    )


def _prepare_model(model: PreTrainedModel, config: FinetuneConfig):
    if config.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would cut the recompute graph
    target = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _training_arguments(
    config: FinetuneConfig, checkpoint_dir: Path, device: str, precision: str
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        # Trainer's default hides NaN/inf step losses from the logs; we want to stop on them.
        logging_nan_inf_filter=False,
        # Checkpoints are safetensors weights plus optimizer/scheduler/RNG state that
        # Trainer reads back with torch.load(weights_only=True): tensors, no pickled code.
        save_strategy="steps" if config.checkpoint_steps else "no",
        save_steps=config.checkpoint_steps or 500,
        save_total_limit=config.checkpoints_kept,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and config.num_processes > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient
        # FSDP2, full sharding, one unit per decoder layer (the model's _no_split_modules).
        fsdp=config.fsdp,  # type: ignore[arg-type]  # annotated str; True is the documented form
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )


def _whole_run_losses(log_history: list[dict[str, Any]]) -> tuple[float, float]:
    """(step-weighted mean, last) of the logged losses; log_history survives resumes."""
    total, steps, last_step, last = 0.0, 0, 0, math.nan
    for entry in log_history:
        if "loss" in entry:
            span = entry["step"] - last_step
            total, steps, last_step, last = (
                total + entry["loss"] * span,
                steps + span,
                entry["step"],
                entry["loss"],
            )
    return (total / steps if steps else math.nan), last


def _save_final(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, config: FinetuneConfig, out_dir: Path
) -> None:
    """safetensors weights + config + tokenizer; LoRA adapters are merged in first."""
    if config.method == "lora":
        if trainer.accelerator.is_main_process:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
    else:
        trainer.save_model(str(out_dir))
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        # Trainer also pickles its arguments there; the model folder holds no pickles.
        (out_dir / "training_args.bin").unlink(missing_ok=True)
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)


__all__ = ["IGNORE_INDEX", "FinetuneConfig", "ModelRef", "NonFiniteLossError", "finetune"]
