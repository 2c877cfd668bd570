"""Fine-tuning: SFT with transformers' Trainer, loss on response tokens only.

Full fine-tuning or LoRA (peft) by config; checkpoints every `checkpoint_steps` into
`out_dir/checkpoints`, and a re-run with the same out_dir (the flow keys it on the inputs)
resumes from the newest complete one: weights, optimizer, scheduler, RNG and data order. A
checkpoint whose files are damaged is discarded, with a warning, for the one before it.
The saved model's md5 comes back in its ModelRef: model_problem checks a cached one against it.
With `num_processes > 1` the same recipe runs in workers under `accelerate launch`
(steps/training/multiprocess.py starts them; each runs steps/training/launch.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from steps.encoding import ChatEncoding, encode_table
from steps.hashing import file_md5
from steps.integrity import md5_problem, safetensors_problem, zip_problem
from steps.modeling import IGNORE_INDEX, ModelConfig, load_model, load_tokenizer
from steps.training.batching import EpochSampler, PaddingCollator, StepsBatchSampler, TokenDataset
from steps.training.callbacks import (
    LogLastStep,
    MlflowStepLogger,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
)
from steps.training.job import FinetuneConfig, ModelRef, TrainJob
from steps.training.multiprocess import run_workers

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # under out_dir; deleted once the final model is saved
WEIGHTS = "model.safetensors"  # the saved model's weights in out_dir (registered by md5)


def finetune(
    train_path: str | Path,
    selected_ids: list[str],
    model_config: ModelConfig,
    config: FinetuneConfig,
    out_dir: Path,
    device: str,
    precision: str,
    run_id: str | None = None,
    chat: ChatEncoding | None = None,
) -> ModelRef:
    """Trains the base model on the selected examples and saves it to out_dir (`chat`: how a
    table of conversations is encoded, steps/encoding.py).

    Resumes from out_dir/checkpoints when an earlier call with the same out_dir was killed.
    The arguments are TrainJob's fields (steps/training/job.py), validated there.
    """
    # Validated, not just constructed: precision arrives as a resolved string.
    job = TrainJob.model_validate(
        {
            "train_path": str(train_path),
            "selected_ids": selected_ids,
            "model": model_config,
            "finetune": config,
            "out_dir": out_dir,
            "device": device,
            "precision": precision,
            "run_id": run_id,
            "chat": chat,
        }
    )
    ref = train(job) if config.num_processes == 1 else run_workers(job, job.out_dir / "launch")
    weights = job.out_dir / WEIGHTS  # absent only when save_pretrained sharded (> 50 GB)
    return replace(ref, weights_md5=file_md5(weights) if weights.is_file() else "")


def model_problem(ref: ModelRef) -> str | None:
    """One line naming what is wrong with a trained model's folder before it is used again
    (a weights file whose header is unreadable, or bytes other than training saved); None
    when it is whole."""
    folder = Path(ref.model_dir)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return f"{folder / WEIGHTS} is missing"
    for path in shards:
        if problem := safetensors_problem(path):
            return problem
    return md5_problem(folder / WEIGHTS, ref.weights_md5) if ref.weights_md5 else None


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint. Trainer writes trainer_state.json last, so a folder
    without a readable one was cut off mid-save (it is overwritten when training gets there)."""
    return next(iter(_complete_checkpoints(checkpoint_dir)), None)


def _complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints with a readable trainer_state.json, newest first."""
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name[11:].isdigit()]
    complete = []
    for path in sorted(found, key=lambda p: int(p.name[11:]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        complete.append(path)
    return complete


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What would stop Trainer resuming from `checkpoint`: a safetensors file (weights,
    adapters) whose header or length is wrong, or a torch.save archive (optimizer, scheduler,
    RNG) that is unreadable or fails its CRCs. Bytes changed inside the weights' tensors pass:
    no checksum of them is recorded, and Trainer would load them."""
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = zip_problem(path)
        else:
            continue
        if problem:
            return problem
    return None


def resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint that can be resumed from. Damaged ones newer than it are deleted
    with a warning naming them (else a re-run would fail on the same file every time), so
    training goes on from the one before, or from the start."""
    for path in _complete_checkpoints(checkpoint_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("finetune: discarding checkpoint %s: %s", path, problem)
        shutil.rmtree(path, ignore_errors=True)  # several ranks may discard it at once
    return None


class SiftTrainer(Trainer):
    """Trainer with a sampler whose order depends only on (seed, epoch): exact resumes.

    steps (finetune.steps): one pass in that many optimiser steps, through a batch sampler of
    steps x gradient_accumulation_steps near-equal batches; Trainer counts the optimiser steps
    of an epoch from the dataloader's length, so it trains exactly `steps`.
    """

    def __init__(self, *args: Any, steps: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.steps = steps

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSampler(
            _lengths(dataset),
            self.args.per_device_train_batch_size,
            self.args.seed,
            self.args.train_sampling_strategy == "group_by_length",
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.steps is None:
            return super().get_train_dataloader()
        dataset = _token_dataset(self.train_dataset)
        sampler = StepsBatchSampler(
            _lengths(dataset),
            self.steps * self.args.gradient_accumulation_steps,
            self.args.seed,
            self.args.train_sampling_strategy == "group_by_length",
        )
        # workers 0 as _training_arguments says; accelerate's skip_first_batches (a resume)
        # wraps a batch sampler as it wraps a sampler
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=0)  # fmt: skip
        return self.accelerator.prepare(loader)


def _token_dataset(dataset: object) -> TokenDataset:
    assert isinstance(dataset, TokenDataset), "SiftTrainer trains on a TokenDataset"
    return dataset


def _lengths(dataset: object) -> list[int]:
    return [len(e.input_ids) for e in _token_dataset(dataset).examples]


def train(job: TrainJob) -> ModelRef:
    """The recipe in this process (one of several under accelerate launch)."""
    config, model_config, out_dir = job.finetune, job.model, job.out_dir
    frame = pd.read_parquet(job.train_path).set_index("id").loc[job.selected_ids]
    tokenizer = load_tokenizer(model_config)
    model = _prepare_model(_pads_as(load_model(model_config, job.device), tokenizer), config)
    examples = encode_table(tokenizer, frame, model_config, job.chat)
    collator = PaddingCollator(tokenizer.pad_token_id)
    trainer = SiftTrainer(
        model=model,
        args=_training_arguments(config, out_dir / CHECKPOINTS, job.device, job.precision),
        train_dataset=TokenDataset(examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[LogLastStep(), StopOnNonFiniteLoss(), MlflowStepLogger(job.run_id)],
        steps=config.steps,
    )
    resume = resume_checkpoint(out_dir / CHECKPOINTS)
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
        run_id=job.run_id,
    )


def _pads_as(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model's config and generation config name the tokenizer's pad id (load_tokenizer
    pads with EOS where the tokenizer has none): the Trainer would set the same values and
    warn that the tokenizer's tokens "differ from the model config"."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


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


# FinetuneConfig and ModelRef live with TrainJob (job.py); this is where callers import them.
__all__ = [
    "IGNORE_INDEX",
    "FinetuneConfig",
    "ModelRef",
    "NonFiniteLossError",
    "finetune",
    "last_checkpoint",
    "model_problem",
    "train",
]
