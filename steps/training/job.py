"""The fine-tune job: its settings, the whole call as one typed spec, and what comes back.

`TrainJob` is the one declaration of a fine-tune call's inputs: finetune() builds it, train()
runs it, and for `num_processes > 1` the parent writes it as JSON and every worker validates it
(steps/training/multiprocess.py starts them, steps/training/launch.py is what each one runs).
A worker answers in a result file: rank 0 writes the `ModelRef` fields; any rank that stopped
on a non-finite loss writes a `WorkerFailure` and exits with `NON_FINITE_LOSS_EXIT`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from transformers import SchedulerType

from steps.encoding import ChatEncoding
from steps.modeling import ModelConfig

# Names Trainer's `lr_scheduler_type` accepts; checked when the config is built, so a typo
# fails `sift show-config` instead of the fine-tune step after ingest, embed and select.
LR_SCHEDULERS = tuple(s.value for s in SchedulerType)
# A worker's exit status when it stopped on a NaN/inf loss. accelerate's launcher reports its
# own status (1) when a worker fails, so the parent reads the result file first; this code is
# what a worker run directly (`python -m steps.training.launch`) reports.
NON_FINITE_LOSS_EXIT = 3


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(
        default=3.0, gt=0, description="Passes over the selected examples (may be fractional)."
    )
    # Compares subsets of different sizes at equal steps (the study's equal-token arms).
    steps: int | None = Field(
        default=None,
        gt=0,
        description="Instead of batch_size batches: one pass (epochs=1) in exactly this many "
        "optimiser steps, batch sizes differing by at most 1; null: batches of batch_size.",
    )
    learning_rate: float = Field(
        default=2e-3,
        gt=0,
        description="Peak learning rate: tiny models tolerate (and need) a large one; ~1e-5–1e-4 "
        "for real LLMs, ~1e-4–1e-3 with LoRA.",
    )
    batch_size: int = Field(default=16, gt=0, description="Examples per micro-batch, per process.")
    gradient_accumulation_steps: int = Field(
        default=1,
        gt=0,
        description="Micro-batches summed into each optimiser step (a larger effective batch "
        "at the same memory).",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    # Kept a plain string, not a Literal, so the resolved config logs and hashes as it did.
    lr_scheduler: str = Field(
        default="cosine",
        description="Learning-rate schedule: one of transformers' SchedulerType values (linear, "
        "cosine, constant, ...).",
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="Optimiser steps of linear warm-up before the schedule."
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0, description="Gradients are clipped to this global L2 norm."
    )
    group_by_length: bool = Field(
        default=True,
        description="Batch examples of similar length: less compute wasted on padding than "
        "random batches.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: ~30% slower, far less "
        "activation memory.",
    )
    logging_steps: int = Field(
        default=10, gt=0, description="Log the training loss every this many optimiser steps."
    )
    seed: int = Field(
        default=0, description="Seed of the training order, dropout and adapter initialisation."
    )
    # LoRA adapters are merged into the weights before saving, so the saved model is a plain
    # one that evaluate and register load like a full fine-tune.
    method: Literal["full", "lora"] = Field(
        default="full",
        description="full: every weight trains; lora: low-rank adapters only (less memory, "
        "smaller optimizer state), merged before saving.",
    )
    lora_r: int = Field(default=16, gt=0, description="LoRA rank of each adapter.")
    lora_alpha: int = Field(
        default=32, gt=0, description="LoRA scaling numerator (updates scale by alpha / r)."
    )
    lora_dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on the LoRA adapters' input."
    )
    lora_target_modules: str | tuple[str, ...] = Field(
        default="all-linear",
        description='Modules that get adapters: names, or "all-linear" (every linear layer but '
        "the output head, peft's shorthand).",
    )
    checkpoint_steps: int = Field(
        default=50,
        ge=0,
        description="Save a resumable checkpoint (weights, optimizer, scheduler, RNG) every N "
        "optimizer steps; 0: none. Frequent saves cost time on big models.",
    )
    checkpoints_kept: int = Field(
        default=2, gt=0, description="Most recent checkpoints kept on disk."
    )
    num_processes: int = Field(
        default=1,
        gt=0,
        description="> 1: data-parallel training in that many processes via `accelerate "
        "launch` (GPUs: one each; CPU: gloo); batch_size is per process.",
    )
    fsdp: bool = Field(
        default=False,
        description="Shard parameters, gradients and optimizer state over the processes (FSDP) "
        "for models that do not fit one GPU; off: DDP replicates the model.",
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An `accelerate config` file for clusters (machines, ranks, FSDP options); "
        "it overrides the launch flags above except num_processes.",
    )

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in LR_SCHEDULERS:
            choices = ", ".join(LR_SCHEDULERS)
            raise ValueError(f"{name!r} is not a scheduler; choose one of: {choices}")
        return name

    @model_validator(mode="after")
    def _check_combinations(self) -> FinetuneConfig:
        if self.fsdp and self.num_processes < 2:
            raise ValueError("finetune.fsdp needs finetune.num_processes > 1")
        if self.fsdp and self.method == "lora":
            raise ValueError("finetune.fsdp with finetune.method 'lora' is not supported; use DDP")
        if self.accelerate_config and self.num_processes < 2:
            raise ValueError("finetune.accelerate_config needs finetune.num_processes > 1")
        if self.steps is not None and self.epochs != 1:
            raise ValueError(
                f"finetune.steps={self.steps} trains one pass in that many steps: set "
                f"finetune.epochs=1 (got {self.epochs:g}) or finetune.steps=null"
            )
        if self.steps is not None and self.num_processes > 1:
            # accelerate would deal the variable-size batches out to the ranks unevenly
            raise ValueError(
                f"finetune.steps={self.steps} runs in one process: set finetune.num_processes=1 "
                f"(got {self.num_processes}) or finetune.steps=null"
            )
        return self


class TrainJob(BaseModel):
    """One fine-tune call: the base model trained on `selected_ids` of the table at train_path,
    saved to out_dir. device and precision are resolved ('cpu'/'cuda', 'fp32'/'bf16'/'fp16')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_path: str  # as pandas reads it: a local path or an fsspec URI
    selected_ids: list[str]  # a list: pandas reads a tuple given to .loc as (rows, columns)
    model: ModelConfig
    finetune: FinetuneConfig
    out_dir: Path
    device: str
    precision: Literal["fp32", "bf16", "fp16"]
    run_id: str | None = None  # the MLflow run that step metrics go to; None: not logged
    chat: ChatEncoding | None = None  # a table of conversations: how they are encoded

    @model_validator(mode="after")
    def _steps_fit_the_examples(self) -> TrainJob:
        # Here, not in the sampler: a worker or the parent stops before any model is loaded.
        steps, accumulation = self.finetune.steps, self.finetune.gradient_accumulation_steps
        if steps is not None and steps * accumulation > len(self.selected_ids):
            per_step = f" x {accumulation} micro-batches" if accumulation > 1 else ""
            raise PydanticCustomError(
                "steps_above_examples",
                "finetune.steps={steps}{per_step} needs at least one example per batch, but "
                "{examples} examples are selected: lower finetune.steps",
                {"steps": steps, "per_step": per_step, "examples": len(self.selected_ids)},
            )
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
    # md5 of model_dir/model.safetensors as training saved it: what a cached ModelRef is
    # checked against before its folder is used again (finetune.model_problem)
    weights_md5: str = ""


class WorkerFailure(BaseModel):
    """What a worker that stopped on a NaN/inf loss leaves in the result file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error: Literal["non_finite_loss"]
    message: str


def write_result(path: Path, result: ModelRef | WorkerFailure) -> None:
    """Atomic (write, then rename): several ranks may report the same failure at once, and the
    parent must never read half a file."""
    fields = result.model_dump() if isinstance(result, WorkerFailure) else asdict(result)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(fields))
    partial.replace(path)


def read_result(path: Path) -> ModelRef | WorkerFailure | None:
    """The workers' answer; None when none was written (a crash before the end)."""
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    return WorkerFailure.model_validate(fields) if "error" in fields else ModelRef(**fields)
