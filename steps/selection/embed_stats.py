"""The math of the embedding pass: one chunk of tokenised examples → per-example statistics.

For example i with loss-bearing states x_i1..x_iT (after the final norm; the state at position
t predicts token t+1), FisherSFT needs only Σ_j x_ij x_ijᵀ: `chunk_statistics` returns a factor
F_i with F_iᵀF_i equal to it (at most d rows, fewer with max_rank), the mean state, the token
count and the mean base-model loss of each example. steps/selection/embed.py runs it chunk by
chunk, writes the results and merges them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from steps.modeling import IGNORE_INDEX, Encoded, autocast, length_sorted_batches, pad_batch


def chunk_statistics(
    model: PreTrainedModel,
    chunk: list[Encoded],
    pad_id: int,
    batch_tokens: int,
    max_rank: int,
    projection: torch.Tensor | None,
    device: str,
    precision: str,
) -> dict[str, np.ndarray]:
    """One chunk's arrays as a chunk file holds them (embed.FILES, plus padded and real token
    counts), from forward passes over length-sorted batches of at most batch_tokens."""
    lengths = [len(e.input_ids) for e in chunk]
    factors: list[np.ndarray] = [np.empty(0)] * len(chunk)
    width = int(model.config.hidden_size) if projection is None else projection.shape[1]
    pooled = np.zeros((len(chunk), width), np.float32)
    base_loss = np.zeros(len(chunk), np.float32)
    n_tokens = np.zeros(len(chunk), np.int64)
    padded = 0
    for rows in length_sorted_batches(lengths, batch_tokens):
        batch = {k: v.to(device) for k, v in pad_batch([chunk[i] for i in rows], pad_id).items()}
        with autocast(device, precision):  # the forward only: the statistics stay fp32/fp64
            states, losses, mask = _batch_states(model, batch)
        if projection is not None:
            states = states @ projection
        batch_factors, batch_pooled, counts, batch_loss = _batch_factors(
            states, losses, mask, max_rank
        )
        for slot, i in enumerate(rows):
            factors[i] = batch_factors[slot]
        pooled[rows] = batch_pooled
        n_tokens[rows] = counts
        base_loss[rows] = batch_loss
        padded += batch["input_ids"].numel() - sum(lengths[i] for i in rows)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in factors])]).astype(np.int64)
    return {
        "factors": np.concatenate(factors).astype(np.float32),
        "offsets": offsets,
        "pooled": pooled,
        "n_tokens": n_tokens,
        "base_loss": base_loss,
        "padded": np.array(padded),
        "tokens": np.array(sum(lengths)),  # real (unpadded) tokens, for the padding fraction
    }


def _batch_states(model: PreTrainedModel, batch: dict[str, torch.Tensor]):
    """Loss-token states (float32), per-token losses and the loss mask of one padded batch."""
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


def _batch_factors(
    states: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor, max_rank: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Per example: a factor F (FᵀF = Σ x xᵀ), the mean state, the token count, the mean loss.

    A factor is the raw loss-token states when there are few enough of them; otherwise the
    top eigen-directions of the Gram, sqrt(w) uᵀ, largest first (computed in float64, in
    torch: numpy's BLAS threads next to torch's oversubscribed 2 cores and ran 5x slower).
    """
    weights = mask.to(states.dtype)
    counts = weights.sum(dim=1)
    masked = states * weights[..., None]
    pooled = masked.sum(dim=1) / counts.clamp_min(1)[:, None]
    mean_loss = (losses * weights).sum(dim=1) / counts.clamp_min(1)
    width = states.shape[-1]
    keep = min(width, max_rank) if max_rank else width
    by_eigen = (counts > keep).nonzero().flatten().tolist()
    eigen_factors: dict[int, np.ndarray] = {}
    if by_eigen:
        x = masked[by_eigen].double()
        values, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)  # ascending
        values, vectors = values[:, -keep:].flip(1), vectors[:, :, -keep:].flip(2)
        top = values.clamp_min(0).sqrt()[:, :, None] * vectors.transpose(1, 2)
        eigen_factors = dict(zip(by_eigen, top.float().cpu().numpy(), strict=True))
    tokens = states[mask].cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(counts.long().cpu().numpy())])
    factors = [
        eigen_factors[slot] if slot in eigen_factors else tokens[bounds[slot] : bounds[slot + 1]]
        for slot in range(len(states))
    ]
    return factors, pooled.cpu().numpy(), counts.long().cpu().numpy(), mean_loss.cpu().numpy()
