"""Evaluation: held-out loss and perplexity on the eval split's response tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    ModelSource,
    autocast,
    encode_examples,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
)


class EvalConfig(BaseModel):
    """Held-out loss (always) and lm-eval benchmarks (eval.suite; steps/evaluation/suites.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_tokens: int = Field(default=16384, gt=0)
    # none | quick | standard | a path to an lm-eval group YAML listing tasks
    suite: str = "quick"
    # Where the suite's data_files are looked up: the bundled 40-row slices by default;
    # a full conversion (assets/eval/README.md) gives numbers comparable with published ones.
    data_dir: str = "assets/eval"
    tasks: tuple[str, ...] = ()  # more tasks: in include_path, or built-in (hub data)
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    limit: int | None = Field(default=None, gt=0)  # documents per task (None: all)
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own default
    batch_size: int = Field(default=16, gt=0)
    generations: int = Field(default=3, ge=0)  # eval prompts answered by each model
    max_new_tokens: int = Field(default=48, gt=0)  # per sample generation


@dataclass(frozen=True)
class EvalReport:
    loss: float  # mean negative log-likelihood per response token (nats)
    perplexity: float
    tokens: int
    examples: int
    # stderr of the mean over response tokens (tokens taken as independent: a lower bound),
    # what lets the gate tell an improvement from noise; None where it was not measured
    loss_stderr: float | None = None


def evaluation_loss(
    model,
    tokenizer,
    eval_path: str,
    model_config: ModelConfig,
    config: EvalConfig,
    device: str,
    precision: str,
) -> EvalReport:
    """Token-weighted mean loss over every response token of the eval split."""
    frame = pd.read_parquet(eval_path)
    encoded = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    batches = length_sorted_batches([len(e.input_ids) for e in encoded], config.batch_tokens)
    total, squares, tokens = 0.0, 0.0, 0
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        for rows in tqdm(batches, desc="evaluate", unit="batch"):
            batch = {
                k: v.to(device)
                for k, v in pad_batch([encoded[i] for i in rows], tokenizer.pad_token_id).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2),
                targets,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )  # 0 at ignored positions
            total += per_token.sum().item()
            squares += per_token.double().square().sum().item()
            tokens += int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError(f"{eval_path}: the eval split has no response tokens to score")
    loss = total / tokens
    variance = max(squares / tokens - loss * loss, 0.0) * tokens / max(tokens - 1, 1)
    return EvalReport(loss=loss, perplexity=math.exp(loss), tokens=tokens, examples=len(frame),
                      loss_stderr=math.sqrt(variance / tokens))  # fmt: skip


def evaluate(
    model: ModelSource, eval_path: str, config: EvalConfig, device: str, precision: str
) -> EvalReport:
    """Loads a model (the base model or a fine-tuned folder) and scores the eval split."""
    return evaluation_loss(
        load_model(model.config, device),
        load_tokenizer(model.config),
        eval_path,
        model.config,
        config,
        device,
        precision,
    )
