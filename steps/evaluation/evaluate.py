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
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_tokens: int = Field(default=16384, gt=0)


@dataclass(frozen=True)
class EvalReport:
    loss: float  # mean negative log-likelihood per response token (nats)
    perplexity: float
    tokens: int
    examples: int


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
    total, tokens = 0.0, 0
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
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2),
                targets,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            tokens += int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError(f"{eval_path}: the eval split has no response tokens to score")
    loss = total / tokens
    return EvalReport(loss=loss, perplexity=math.exp(loss), tokens=tokens, examples=len(frame))


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


def evaluate_registered(
    model_uri: str,
    eval_path: str,
    model_config: ModelConfig,
    config: EvalConfig,
    device: str,
    precision: str,
) -> float:
    """Scores a registry model (e.g. models:/name@champion) on the eval split; returns the loss."""
    import mlflow

    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model = components["model"].to(device)
    return evaluation_loss(
        model, components["tokenizer"], eval_path, model_config, config, device, precision
    ).loss
