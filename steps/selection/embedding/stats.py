"""The math of the embedding pass: one chunk of tokenised examples → per-example statistics.

For example i with loss-bearing states x_i1..x_iT (after the final norm; the state at position
t predicts token t+1), FisherSFT needs only Σ_j x_ij x_ijᵀ: `chunk_statistics` returns a factor
F_i with F_iᵀF_i equal to it (at most d rows, fewer with max_rank), the mean state, the token
count and the mean base-model loss of each example. embed.py runs it chunk by
chunk, writes the results and merges them.

With label_weighted it also returns each example's factor of Σ_j w_j x_j x_jᵀ, where
w = ‖p − e_y‖² is the token's share of the last layer's empirical Fisher
(p − e_y)(p − e_y)ᵀ ⊗ x xᵀ (p: the model's softmax at that position, y: the true next token;
see `label_weights`): each state is scaled by sqrt(w) and factored like the plain ones.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from steps.hardware import autocast
from steps.modeling import IGNORE_INDEX, Encoded, length_sorted_batches, pad_batch


def chunk_statistics(
    model: PreTrainedModel,
    chunk: list[Encoded],
    pad_id: int,
    batch_tokens: int,
    max_rank: int,
    projection: torch.Tensor | None,
    device: str,
    precision: str,
    label_weighted: bool = False,
) -> dict[str, np.ndarray]:
    """One chunk's arrays as a chunk file holds them (embed.FILES, plus padded and real token
    counts, plus embed.LABEL_FILES when label_weighted), from forward passes over
    length-sorted batches of at most batch_tokens."""
    lengths = [len(e.input_ids) for e in chunk]
    factors: list[np.ndarray] = [np.empty(0)] * len(chunk)
    label_factors: list[np.ndarray] = [np.empty(0)] * len(chunk)
    width = int(model.config.hidden_size) if projection is None else projection.shape[1]
    pooled = np.zeros((len(chunk), width), np.float32)
    base_loss = np.zeros(len(chunk), np.float32)
    n_tokens = np.zeros(len(chunk), np.int64)
    padded = 0
    for rows in length_sorted_batches(lengths, batch_tokens):
        batch = {k: v.to(device) for k, v in pad_batch([chunk[i] for i in rows], pad_id).items()}
        with autocast(device, precision):  # the forward only: the statistics stay fp32/fp64
            states, losses, mask, weights = _batch_states(model, batch, label_weighted)
        if projection is not None:
            states = states @ projection
        batch_factors, batch_pooled, counts, batch_loss = _batch_factors(
            states, losses, mask, max_rank
        )
        for slot, i in enumerate(rows):
            factors[i] = batch_factors[slot]
        if weights is not None:  # x → sqrt(w) x commutes with the projection
            scaled = states * weights.sqrt()[..., None]
            for slot, factor in enumerate(_batch_factors(scaled, losses, mask, max_rank)[0]):
                label_factors[rows[slot]] = factor
        pooled[rows] = batch_pooled
        n_tokens[rows] = counts
        base_loss[rows] = batch_loss
        padded += batch["input_ids"].numel() - sum(lengths[i] for i in rows)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in factors])]).astype(np.int64)
    label = {"label_factors": np.concatenate(label_factors).astype(np.float32)}
    return {
        **(label if label_weighted else {}),
        "factors": np.concatenate(factors).astype(np.float32),
        "offsets": offsets,
        "pooled": pooled,
        "n_tokens": n_tokens,
        "base_loss": base_loss,
        "padded": np.array(padded),
        "tokens": np.array(sum(lengths)),  # real (unpadded) tokens, for the padding fraction
    }


def _batch_states(model: PreTrainedModel, batch: dict[str, torch.Tensor], label_weighted: bool):
    """Loss-token states (float32), per-token losses, the loss mask of one padded batch and,
    when label_weighted, each loss token's label weight (0 elsewhere; else None)."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    states, logits = _states_and_loss_logits(model, batch, mask)
    logits = logits.float()
    losses = torch.zeros(mask.shape, dtype=torch.float32, device=states.device)
    losses[mask] = torch.nn.functional.cross_entropy(logits, targets[mask], reduction="none")
    weights = None
    if label_weighted:  # a (loss tokens, vocabulary) softmax, not (B, T, V)
        weights = torch.zeros_like(losses)
        weights[mask] = label_weights(logits, targets[mask])
    return states.float(), losses, mask, weights


# Config fields by which a model's forward changes its logits after the output projection
# (Gemma 2/3, Cohere, Granite): for those the head cannot be applied on its own.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _states_and_loss_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's states after the final norm, (B, T-1, d), and the logits at the loss
    positions only, (loss tokens, V). Where the head is one plain projection, the decoder runs
    without it and the head sees the loss positions alone: on a real vocabulary (SmolLM2:
    49,152 entries) logits at every position cost nearly half the pass."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    transformed = any(getattr(model.config, name, None) not in (None, 1, 1.0)
                      for name in _LOGIT_TRANSFORMS)  # fmt: skip
    if isinstance(head, torch.nn.Linear) and body is not None and not transformed:
        states = body(**inputs).last_hidden_state[:, :-1]  # position t predicts token t+1
        return states, head(states[mask])
    out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][:, :-1], out.logits[:, :-1][mask]


def label_weights(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """w = ‖p − e_y‖² = 1 − 2 p_y + Σ_c p_c² per row of (n, V) logits, p = softmax(logits).

    Summed as (1 − p_y)² + Σ_{c≠y} p_c², the same number without the cancellation of
    1 − 2 p_y + p_y² when p_y ≈ 1: a token the model predicts gets w ≈ 0, not float32 noise.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(len(targets), device=logits.device)
    miss = -torch.expm1(log_p[rows, targets])  # 1 − p_y, exact near p_y = 1
    others = log_p.exp().index_put((rows, targets), torch.zeros((), device=logits.device))
    return miss**2 + (others**2).sum(dim=-1)


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
