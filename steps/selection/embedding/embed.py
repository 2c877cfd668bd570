"""Embedding pass: per-example sufficient statistics of the base model's pre-logit states.

For example i with loss-bearing states x_i1..x_iT (after the final norm; the state at position
t predicts token t+1), FisherSFT needs only Σ_j x_ij x_ijᵀ. We store a factor F_i with
F_iᵀF_i equal to it (at most d rows), never all N·T·d token states; the forward pass and
that math are stats.py, this module runs them over the pool.

Large hidden sizes get a documented sketch (EmbedConfig): states wider than `sketch_dim` are
projected by a seeded Gaussian matrix P (x → Pᵀx, Johnson–Lindenstrauss; the same P as
steps.selection.selectors.project), and `max_rank` keeps only each example's top eigen-directions.
tests/model/test_embed_stats.py measures what both cost on the exact objective.

The pass streams: every `chunk_examples` examples are written to disk as one chunk-*.npz,
so memory stays bounded and an interrupted pass resumes at the first missing chunk. The
finished folder holds FILES as .npy (memory-mappable) plus meta.json.

The folder's files, and what proves each whole (an md5 recorded as it is written), are
files.py: a damaged chunk is computed again, with a warning naming it.

The chunk is also the unit of parallelism: with `num_processes > 1` workers started by
`accelerate launch` (multiprocess.py) each compute every N-th missing
chunk, exactly as one process would, and this process merges them in pool order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from steps.encoding import ChatEncoding, encode_table
from steps.hashing import code_fingerprint
from steps.modeling import IGNORE_INDEX, Encoded, ModelConfig, load_model, load_tokenizer
from steps.paths import private_partial
from steps.selection.embedding.config import EmbedConfig
from steps.selection.embedding.files import (
    chunk_path,
    drop_corrupt_chunks,
    folder_problem,
    record_checksums,
    save_chunk,
    start_folder,
)
from steps.selection.embedding.multiprocess import run_workers
from steps.selection.embedding.stats import chunk_statistics
from steps.selection.pool import FeaturePool, random_projection

FILES = ("factors", "offsets", "pooled", "n_tokens", "base_loss")
LABEL_FILES = ("label_factors",)  # with embed.token_weight=label, row for row beside factors
log = logging.getLogger(__name__)


class EmbedJob(BaseModel):
    """One multi-process pass: the chunks still missing of the pool at table_path, computed
    by the workers (launch.py reads this from JSON and validates it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table_path: str
    model: ModelConfig
    embed: EmbedConfig
    out_dir: Path
    device: str  # resolved: 'cpu' or 'cuda' (each worker takes its own GPU)
    precision: Literal["fp32", "bf16", "fp16"]
    hidden_size: int  # recorded in the manifest by the parent; each worker checks its model's
    chunks: list[int]  # chunk numbers to compute; worker r of N takes chunks[r::N]
    chat: ChatEncoding | None = None  # a pool of conversations: how they are encoded


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
    precision: str = "fp32"  # what the forward passes computed in (see hardware.autocast)
    token_weight: str = "none"  # "label": LABEL_FILES are there too (EmbedConfig.token_weight)


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
    names = FILES + (LABEL_FILES if ref.token_weight == "label" else ())
    folder = Path(ref.features_dir)
    # each file is named for the FeaturePool field it holds
    return FeaturePool(
        **{name: np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r")) for name in names}
    )


def features_problem(ref: FeaturesRef) -> str | None:
    """One line naming a damaged file of a finished pass (embed_files.folder_problem)."""
    return folder_problem(Path(ref.features_dir))


def embed_pool(
    table_path: str,
    model_config: ModelConfig,
    config: EmbedConfig,
    out_dir: Path,
    device: str,
    precision: str,
    chat: ChatEncoding | None = None,
) -> FeaturesRef:
    """One inference pass over the pool in length-sorted batches; writes FILES to out_dir.
    `chat`: how a pool of conversations is encoded (steps/encoding.py).

    With config.num_processes > 1 the chunks are computed by that many worker processes and
    merged here: the same FILES, byte for byte on CPU, as one process writes.
    """
    frame = pd.read_parquet(table_path)
    tokenizer = load_tokenizer(model_config)
    encoded = encode_table(tokenizer, frame, model_config, chat)
    _require_loss_tokens(encoded, list(frame.id), model_config)
    if config.num_processes == 1:
        model = load_model(model_config, device).eval()
        pad_id = tokenizer.pad_token_id
        return embed_encoded(model, encoded, pad_id, config, out_dir, device, precision)
    return _embed_in_workers(
        table_path, model_config, config, len(encoded), out_dir, device, precision, chat
    )


def _embed_in_workers(
    table_path: str,
    model_config: ModelConfig,
    config: EmbedConfig,
    examples: int,
    out_dir: Path,
    device: str,
    precision: str,
    chat: ChatEncoding | None,
) -> FeaturesRef:
    """embed_pool's multi-process path: the manifest here, the missing chunks in the workers,
    the merge here (the pool's tokenisation was already checked by the caller)."""
    settings = AutoConfig.from_pretrained(
        model_config.name,
        revision=model_config.revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    hidden = int(settings.hidden_size)
    start_folder(out_dir, _manifest(examples, hidden, config, device, precision))
    count = len(_chunk_rows(examples, config))
    drop_corrupt_chunks(out_dir, count)
    missing = [n for n in range(count) if not chunk_path(out_dir, n).exists()]
    if 0 < len(missing) < config.num_processes:
        log.warning(
            "embed: %d chunk(s) to compute in embed.num_processes=%d; lower "
            "embed.chunk_examples to keep every process busy",
            len(missing),
            config.num_processes,
        )
    speed = 0.0
    if missing:  # else every chunk is on disk already: nothing to launch
        job = EmbedJob.model_validate(
            {
                "table_path": table_path,
                "model": model_config,
                "embed": config,
                "out_dir": out_dir,
                "device": device,
                "precision": precision,
                "hidden_size": hidden,
                "chunks": missing,
                "chat": chat,
            }
        )
        reports = run_workers(job.model_dump_json(), config.num_processes, device, out_dir)
        # all workers' tokens over the slowest one's loop: model loading is left out, as it is
        # from a one-process pass's rate
        speed = sum(r.tokens for r in reports) / max(max(r.seconds for r in reports), 1e-9)
    return _consolidate(out_dir, count, hidden, speed, precision)


def embed_shard(job: EmbedJob, chunks: list[int], device: str) -> tuple[int, float]:
    """A worker's share of a multi-process pass: these chunks of the job's pool, on `device`
    (this worker's GPU, or 'cpu'). Returns embed_chunks' (tokens computed, seconds)."""
    frame = pd.read_parquet(job.table_path)
    tokenizer = load_tokenizer(job.model)
    model = load_model(job.model, device).eval()
    if int(model.config.hidden_size) != job.hidden_size:
        raise ValueError(
            f"model {job.model.name!r} loads with hidden_size={model.config.hidden_size}, "
            f"but its config (recorded in the manifest) says {job.hidden_size}"
        )
    rows = _chunk_rows(len(frame), job.embed)
    encoded = {
        n: encode_table(tokenizer, frame.iloc[rows[n].start : rows[n].stop], job.model, job.chat)
        for n in chunks
    }
    pad_id = tokenizer.pad_token_id
    return embed_chunks(model, encoded, pad_id, job.embed, job.out_dir, device, job.precision)


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
    start_folder(out_dir, _manifest(len(encoded), hidden, config, device, precision))
    rows = _chunk_rows(len(encoded), config)
    drop_corrupt_chunks(out_dir, len(rows))
    chunks = {number: [encoded[i] for i in chunk] for number, chunk in enumerate(rows)}
    computed, seconds = embed_chunks(model, chunks, pad_id, config, out_dir, device, precision)
    speed = computed / seconds if computed else 0.0
    return _consolidate(out_dir, len(rows), hidden, speed, precision)


def embed_chunks(
    model: PreTrainedModel,
    chunks: dict[int, list[Encoded]],
    pad_id: int,
    config: EmbedConfig,
    out_dir: Path,
    device: str,
    precision: str,
) -> tuple[int, float]:
    """Writes chunk-<number>.npz for each chunk not on disk yet: (tokens computed, seconds)."""
    hidden = int(model.config.hidden_size)
    width = config.sketch_dim if 0 < config.sketch_dim < hidden else hidden
    projection = None
    if width < hidden:
        projection = torch.from_numpy(random_projection(hidden, width, config.sketch_seed))
        projection = projection.to(device)
    sizes = {number: sum(len(e.input_ids) for e in chunk) for number, chunk in chunks.items()}
    computed = 0
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(total=sum(sizes.values()), desc="embed", unit="tok") as bar:
        for number, chunk in chunks.items():
            path = chunk_path(out_dir, number)
            if not path.exists():
                stats = chunk_statistics(
                    model,
                    chunk,
                    pad_id,
                    config.batch_tokens,
                    config.max_rank,
                    projection,
                    device,
                    precision,
                    label_weighted=config.token_weight == "label",
                )
                save_chunk(path, stats)
                computed += sizes[number]
            bar.update(sizes[number])
    return computed, time.perf_counter() - started


def _manifest(examples: int, hidden: int, config: EmbedConfig, device: str, precision: str):
    return {
        "examples": examples,
        "hidden_size": hidden,
        # who computes a chunk does not change it: N processes resume one's chunks and back
        "config": config.model_dump(exclude={"num_processes"}),
        # chunks made by other code, on another device or in another precision differ
        "code": code_fingerprint(__name__),
        "device": device,
        "precision": precision,
    }


def _chunk_rows(examples: int, config: EmbedConfig) -> list[range]:
    step = config.chunk_examples
    return [range(start, min(start + step, examples)) for start in range(0, examples, step)]


def _consolidate(
    out_dir: Path, chunks: int, hidden: int, tokens_per_second: float, precision: str
) -> FeaturesRef:
    """Chunks → one memory-mappable .npy per array, copied chunk by chunk (bounded memory)."""
    paths = [chunk_path(out_dir, n) for n in range(chunks)]
    with np.load(paths[0]) as first:  # the manifest made every chunk alike
        token_weight = "label" if "label_factors" in first.files else "none"
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
    if token_weight == "label":
        shapes["label_factors"] = shapes["factors"]
    # Written under private names and moved into place whole: a run of the same project that
    # already reads this folder (same pool, same key) never sees a file being rewritten.
    partial = {name: private_partial(out_dir / f"{name}.npy") for name in shapes}
    out = {
        name: np.lib.format.open_memmap(partial[name], "w+", dtype, shape)
        for name, (shape, dtype) in shapes.items()
    }
    example = row = 0
    out["offsets"][0] = 0
    for path, (count, chunk_rows, _) in zip(paths, sizes, strict=True):
        with np.load(path) as chunk:
            out["factors"][row : row + chunk_rows] = chunk["factors"]
            if "label_factors" in out:
                out["label_factors"][row : row + chunk_rows] = chunk["label_factors"]
            out["offsets"][example + 1 : example + count + 1] = chunk["offsets"][1:] + row
            for name in ("pooled", "n_tokens", "base_loss"):
                out[name][example : example + count] = chunk[name]
        example, row = example + count, row + chunk_rows
    loss_tokens = int(np.asarray(out["n_tokens"]).sum())
    for array in out.values():
        array.flush()
    del out
    for name, path in partial.items():
        os.replace(path, out_dir / f"{name}.npy")
    record_checksums(out_dir, [f"{name}.npy" for name in shapes])
    ref = FeaturesRef(
        features_dir=str(out_dir),
        examples=n,
        dim=width,
        loss_tokens=loss_tokens,
        padding_fraction=padded / max(padded + tokens, 1),
        hidden_size=hidden,
        tokens_per_second=tokens_per_second,
        precision=precision,
        token_weight=token_weight,
    )
    (out_dir / "meta.json").write_text(json.dumps(asdict(ref), indent=2))
    return ref
