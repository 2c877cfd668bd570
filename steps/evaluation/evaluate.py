"""Evaluation: held-out loss and perplexity on the eval split's response tokens (a
conversation's: its assistant turns' that data.conversation.train_on names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from steps.encoding import ChatEncoding, encode_table
from steps.hardware import autocast
from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    ModelSource,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
)


class EvalConfig(BaseModel):
    """Held-out loss (always) and lm-eval benchmarks (eval.suite; steps/evaluation/suites.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_tokens: int = Field(
        default=16384,
        gt=0,
        description="Padded tokens per forward batch of the held-out loss: larger is faster "
        "until memory runs out.",
    )
    suite: str = Field(
        default="quick",
        description="lm-eval benchmarks: none, quick (40 rows a task), standard (quick + "
        "OpenBookQA, GSM8K), real (quick's tasks on 500 rows), or a path to an lm-eval group "
        "YAML listing tasks.",
    )
    data_dir: str = Field(
        default="assets/eval",
        description="Where the suite's data_files are looked up: the bundled slices (40 rows; "
        "500/ holds real's), or a full conversion (assets/eval/README.md) for numbers "
        "comparable with published ones.",
    )
    tasks: tuple[str, ...] = Field(
        default=(),
        description="More lm-eval tasks: in include_path, or built-in ones (hub data).",
    )
    include_path: str | None = Field(
        default=None, description="A folder of your own lm-eval task YAMLs."
    )
    limit: int | None = Field(
        default=None, gt=0, description="Documents per benchmark task; null: all."
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, description="Few-shot examples per prompt; null: each task's own."
    )
    batch_size: int = Field(default=16, gt=0, description="lm-eval's batch size.")
    generations: int = Field(
        default=3,
        ge=0,
        description="Eval prompts each model answers, logged as sample generations; 0: none.",
    )
    max_new_tokens: int = Field(
        default=48, gt=0, description="Tokens generated per sample generation at most."
    )


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
    chat: ChatEncoding | None = None,
) -> EvalReport:
    """Token-weighted mean loss over every response token of the eval split (`chat`: how a
    split of conversations is encoded, steps/encoding.py)."""
    frame = pd.read_parquet(eval_path)
    encoded = encode_table(tokenizer, frame, model_config, chat)
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
    model: ModelSource,
    eval_path: str,
    config: EvalConfig,
    device: str,
    precision: str,
    chat: ChatEncoding | None = None,
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
        chat,
    )
