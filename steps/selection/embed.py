"""Embedding pass: per-example sufficient statistics of the base model's pre-logit states.

For example i with loss-bearing states x_i1..x_iT (after the final norm; the state at position
t predicts token t+1), FisherSFT needs only Σ_j x_ij x_ijᵀ. We store a factor F_i with
F_iᵀF_i equal to it (at most d rows), never all N·T·d token states.

Large hidden sizes get a documented sketch (EmbedConfig): states wider than `sketch_dim` are
projected by a seeded Gaussian matrix P (x → Pᵀx, Johnson–Lindenstrauss; the same P as
steps.selection.selectors.project), and `max_rank` keeps only each example's top eigen-directions.
tests/model/test_embed_stats.py measures what both cost on the exact objective.

The pass streams: every `chunk_examples` examples are written to disk as one chunk-*.npz,
so memory stays bounded and an interrupted pass resumes at the first missing chunk. The
finished folder holds FILES as .npy (memory-mappable) plus meta.json.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from steps.hashing import code_fingerprint
from steps.modeling import (
    IGNORE_INDEX,
    Encoded,
    ModelConfig,
    autocast,
    encode_examples,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
)
from steps.selection.pool import FeaturePool, random_projection

FILES = ("factors", "offsets", "pooled", "n_tokens", "base_loss")


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Padded tokens per forward batch: larger is faster until memory runs out.
    batch_tokens: int = Field(default=16384, gt=0)
    # Hidden states wider than this are projected to this many dimensions before their
    # statistics are formed (a d x d Gram per example is too big at d >= 1k); 0 never does.
    sketch_dim: int = Field(default=256, ge=0)
    # Keep at most this many factor rows per example (its top eigen-directions); 0 keeps
    # all (<= the state width). Bounds the statistics at N x max_rank x width floats.
    max_rank: int = Field(default=0, ge=0)
    # Seed of the projection: fixed, so a re-run or another budget sees the same sketch.
    sketch_seed: int = 0
    # Examples per chunk on disk: the unit of streaming and of resuming.
    chunk_examples: int = Field(default=4096, gt=0)


@dataclass(frozen=True)
class FeaturesRef:
    """A folder of per-example statistics (see FILES) for one model × data × settings."""

    features_dir: str
    examples: int
    dim: int  # width of the stored statistics (the sketch width when sketched)
    loss_tokens: int
    padding_fraction: float
    hidden_size: int = 0  # the model's d, before any sketch
    tokens_per_second: float = 0.0  # of this pass (0 when every chunk came from disk)
    precision: str = "fp32"  # what the forward passes computed in (see modeling.autocast)


def feature_space(features: FeaturesRef, model_md5: str, config: EmbedConfig) -> str:
    """Names the space the statistics live in: the model's weights, the stored width, the
    precision the states were computed in and, when sketched, the projection's seed.

    Designs (Σ FᵀF) measured in different spaces cannot be added, so a selection records this
    and a warm start (select.prior) refuses a prior whose space differs.
    """
    space = f"model={model_md5} width={features.dim} precision={features.precision}"
    if features.dim < features.hidden_size:  # sketched: P depends on the seed
        space += f" sketch_seed={config.sketch_seed}"
    return space


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


def embed_pool(
    table_path: str,
    model_config: ModelConfig,
    config: EmbedConfig,
    out_dir: Path,
    device: str,
    precision: str,
) -> FeaturesRef:
    """One inference pass over the pool in length-sorted batches; writes FILES to out_dir."""
    frame = pd.read_parquet(table_path)
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, device).eval()
    encoded = encode_examples(tokenizer, list(frame.prompt), list(frame.response), model_config)
    _require_loss_tokens(encoded, list(frame.id), model_config)
    return embed_encoded(model, encoded, tokenizer.pad_token_id, config, out_dir, device, precision)


def _require_loss_tokens(encoded: list[Encoded], ids: list[str], model: ModelConfig) -> None:
    empty = [i for i, e in enumerate(encoded) if all(t == IGNORE_INDEX for t in e.labels[1:])]
    if empty:
        shown = ", ".join(f"row {i} (id {ids[i]})" for i in empty[:5])
        raise ValueError(
            f"{len(empty)} example(s) have no loss-bearing response tokens, e.g. {shown}: "
            f"empty responses, or prompts filling model.max_length={model.max_length}"
        )


def embed_encoded(
    model: PreTrainedModel,
    encoded: list[Encoded],
    pad_id: int,
    config: EmbedConfig,
    out_dir: Path,
    device: str,
    precision: str,
) -> FeaturesRef:
    """The pass itself over tokenised examples (also what benchmarks/bench_embed.py times)."""
    hidden = int(model.config.hidden_size)
    width = config.sketch_dim if 0 < config.sketch_dim < hidden else hidden
    projection = None
    if width < hidden:
        projection = torch.from_numpy(random_projection(hidden, width, config.sketch_seed))
        projection = projection.to(device)
    manifest = {
        "examples": len(encoded),
        "hidden_size": hidden,
        "config": config.model_dump(),
        # chunks made by other code, on another device or in another precision differ
        "code": code_fingerprint(__name__),
        "device": device,
        "precision": precision,
    }
    _start_folder(out_dir, manifest)
    lengths = [len(e.input_ids) for e in encoded]
    padded = computed = 0
    started = time.perf_counter()
    starts = range(0, len(encoded), config.chunk_examples)
    with torch.inference_mode(), tqdm(total=sum(lengths), desc="embed", unit="tok") as bar:
        for number, start in enumerate(starts):
            rows = range(start, min(start + config.chunk_examples, len(encoded)))
            path = out_dir / f"chunk-{number:05d}.npz"
            if not path.exists():
                chunk = [encoded[i] for i in rows]
                stats = _chunk_statistics(
                    model, chunk, pad_id, config, projection, device, precision
                )
                _save_atomic(path, stats)
                padded += int(stats["padded"])
                computed += sum(lengths[i] for i in rows)
            bar.update(sum(lengths[i] for i in rows))
    seconds = time.perf_counter() - started
    speed = computed / seconds if computed else 0.0
    return _consolidate(out_dir, len(starts), hidden, speed, precision)


def _start_folder(out_dir: Path, manifest: dict) -> None:
    """Chunks left by an interrupted pass are reused only if they were made the same way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.json"
    if path.exists() and json.loads(path.read_text()) != manifest:
        for stale in out_dir.glob("chunk-*.npz"):
            stale.unlink()
    path.write_text(json.dumps(manifest, indent=2))


def _chunk_statistics(
    model: PreTrainedModel,
    chunk: list[Encoded],
    pad_id: int,
    config: EmbedConfig,
    projection: torch.Tensor | None,
    device: str,
    precision: str,
) -> dict[str, np.ndarray]:
    lengths = [len(e.input_ids) for e in chunk]
    factors: list[np.ndarray] = [np.empty(0)] * len(chunk)
    width = int(model.config.hidden_size) if projection is None else projection.shape[1]
    pooled = np.zeros((len(chunk), width), np.float32)
    base_loss = np.zeros(len(chunk), np.float32)
    n_tokens = np.zeros(len(chunk), np.int64)
    padded = 0
    for rows in length_sorted_batches(lengths, config.batch_tokens):
        batch = {k: v.to(device) for k, v in pad_batch([chunk[i] for i in rows], pad_id).items()}
        with autocast(device, precision):  # the forward only: the statistics stay fp32/fp64
            states, losses, mask = _batch_states(model, batch)
        if projection is not None:
            states = states @ projection
        batch_factors, batch_pooled, counts, batch_loss = _batch_factors(
            states, losses, mask, config.max_rank
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


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write-then-rename: a killed pass never leaves a half chunk that looks complete."""
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
    os.replace(partial, path)


def _consolidate(
    out_dir: Path, chunks: int, hidden: int, tokens_per_second: float, precision: str
) -> FeaturesRef:
    """Chunks → one memory-mappable .npy per array, copied chunk by chunk (bounded memory)."""
    paths = [out_dir / f"chunk-{n:05d}.npz" for n in range(chunks)]
    sizes = []
    padded = tokens = 0
    for path in paths:
        with np.load(path) as chunk:
            # offsets and pooled are small: the sizes without reading the factors twice
            offsets, pooled = chunk["offsets"], chunk["pooled"]
            sizes.append((len(pooled), int(offsets[-1]), pooled.shape[1]))
            padded, tokens = padded + int(chunk["padded"]), tokens + int(chunk["tokens"])
    n, rows, width = sum(s[0] for s in sizes), sum(s[1] for s in sizes), sizes[0][2]
    shapes = {
        "factors": ((rows, width), np.float32),
        "offsets": ((n + 1,), np.int64),
        "pooled": ((n, width), np.float32),
        "n_tokens": ((n,), np.int64),
        "base_loss": ((n,), np.float32),
    }
    out = {
        name: np.lib.format.open_memmap(out_dir / f"{name}.npy", "w+", dtype, shape)
        for name, (shape, dtype) in shapes.items()
    }
    example = row = 0
    out["offsets"][0] = 0
    for path, (count, chunk_rows, _) in zip(paths, sizes, strict=True):
        with np.load(path) as chunk:
            out["factors"][row : row + chunk_rows] = chunk["factors"]
            out["offsets"][example + 1 : example + count + 1] = chunk["offsets"][1:] + row
            for name in ("pooled", "n_tokens", "base_loss"):
                out[name][example : example + count] = chunk[name]
        example, row = example + count, row + chunk_rows
    loss_tokens = int(np.asarray(out["n_tokens"]).sum())
    for array in out.values():
        array.flush()
    del out
    ref = FeaturesRef(
        features_dir=str(out_dir),
        examples=n,
        dim=width,
        loss_tokens=loss_tokens,
        padding_fraction=padded / max(padded + tokens, 1),
        hidden_size=hidden,
        tokens_per_second=tokens_per_second,
        precision=precision,
    )
    (out_dir / "meta.json").write_text(json.dumps(asdict(ref), indent=2))
    return ref
