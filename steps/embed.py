"""Embedding pass: per-example sufficient statistics of the base model's pre-logit states.

For example i with loss-bearing states x_i1..x_iT (after the final norm; the state at position
t predicts token t+1), FisherSFT needs only Σ_j x_ij x_ijᵀ. We store a factor F_i with
F_iᵀF_i equal to it (at most d rows), never all N·T·d token states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    encode_examples,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
)
from steps.selectors import FeaturePool

FILES = ("factors", "offsets", "pooled", "n_tokens", "base_loss")


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Padded tokens per forward batch: larger is faster until memory runs out.
    batch_tokens: int = Field(default=16384, gt=0)


@dataclass(frozen=True)
class FeaturesRef:
    """A folder of per-example statistics (see FILES) for one model × data × settings."""

    features_dir: str
    examples: int
    dim: int
    loss_tokens: int
    padding_fraction: float


def load_pool(ref: FeaturesRef) -> FeaturePool:
    arrays = {
        name: np.load(Path(ref.features_dir) / f"{name}.npy", mmap_mode="r") for name in FILES
    }
    return FeaturePool(
        factors=np.asarray(arrays["factors"]),
        offsets=np.asarray(arrays["offsets"]),
        pooled=np.asarray(arrays["pooled"]),
        n_tokens=np.asarray(arrays["n_tokens"]),
        base_loss=np.asarray(arrays["base_loss"]),
    )


def _batch_statistics(model, batch: dict[str, torch.Tensor], autocast: bool):
    """Loss-token states and per-token losses of one padded batch."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
    states = out.hidden_states[-1][:, :-1].float()  # position t predicts token t+1
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].float().transpose(1, 2),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return states, losses, targets != IGNORE_INDEX


def embed_pool(
    table_path: str, model_config: ModelConfig, config: EmbedConfig, out_dir: Path, device: str
) -> FeaturesRef:
    """One inference pass over the pool in length-sorted batches; writes FILES to out_dir."""
    frame = pd.read_parquet(table_path)
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, device).eval()
    encoded = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    lengths = [len(e.input_ids) for e in encoded]
    d = model.config.hidden_size
    factors: list[np.ndarray] = [np.empty((0, d), np.float32)] * len(encoded)
    pooled = np.zeros((len(encoded), d), np.float32)
    base_loss = np.zeros(len(encoded), np.float32)
    n_tokens = np.zeros(len(encoded), np.int64)
    padded = 0
    batches = length_sorted_batches(lengths, config.batch_tokens)
    autocast = device == "cuda"  # bf16 autocast is a GPU speed-up; CPU stays exact fp32
    with torch.inference_mode(), tqdm(total=sum(lengths), desc="embed", unit="tok") as bar:
        for rows in batches:
            batch = {
                k: v.to(device)
                for k, v in pad_batch([encoded[i] for i in rows], tokenizer.pad_token_id).items()
            }
            states, losses, mask = _batch_statistics(model, batch, autocast)
            for slot, i in enumerate(rows):
                x = states[slot][mask[slot]].double()
                n_tokens[i] = len(x)
                pooled[i] = x.mean(dim=0).cpu().numpy() if len(x) else 0.0
                base_loss[i] = losses[slot][mask[slot]].mean().item() if len(x) else np.nan
                factors[i] = _factor(x).float().cpu().numpy()
            padded += batch["input_ids"].numel() - sum(lengths[i] for i in rows)
            bar.update(sum(lengths[i] for i in rows))
    return _write(out_dir, factors, pooled, n_tokens, base_loss, padded, sum(lengths))


def _factor(x: torch.Tensor) -> torch.Tensor:
    """F with FᵀF = xᵀx and min(T, d) rows (as selectors.factor_from_tokens, but in torch:
    numpy's BLAS threads next to torch's oversubscribe 2 cores and ran 5x slower)."""
    if x.shape[0] <= x.shape[1]:
        return x
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)
    return eigenvalues.clamp_min(0).sqrt()[:, None] * eigenvectors.T


def _write(
    out_dir: Path, factors, pooled, n_tokens, base_loss, padded: int, tokens: int
) -> FeaturesRef:
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(factors) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f) for f in factors])
    arrays = {
        "factors": np.concatenate(factors),
        "offsets": offsets,
        "pooled": pooled,
        "n_tokens": n_tokens,
        "base_loss": base_loss,
    }
    for name, array in arrays.items():
        np.save(out_dir / f"{name}.npy", array)
    ref = FeaturesRef(
        features_dir=str(out_dir),
        examples=len(factors),
        dim=pooled.shape[1],
        loss_tokens=int(n_tokens.sum()),
        padding_fraction=padded / max(padded + tokens, 1),
    )
    (out_dir / "meta.json").write_text(json.dumps(ref.__dict__, indent=2))
    return ref
