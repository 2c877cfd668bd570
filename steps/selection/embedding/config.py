"""EmbedConfig: the `embed` section (how the pool's forward pass forms each example's
selection statistics); the pass itself is steps/selection/embedding/embed.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_tokens: int = Field(
        default=16384,
        gt=0,
        description="Padded tokens per forward batch: larger is faster until memory runs out.",
    )
    # At d=768 (benchmarks/bench_sketch.py) 32 / 64 / 128 / 256 dims kept 0.994 / 0.997 / 0.998
    # / 1.000 of the exact picks' gain: 64 is the smallest within 0.5% (docs/results/benchmarks.md,
    # "How faithful the sketch is"). A d x d Gram per example is too big at d >= 1k.
    sketch_dim: int = Field(
        default=64,
        ge=0,
        description="Hidden states wider than this are randomly projected to this many "
        "dimensions before their statistics are formed; 0 never projects.",
    )
    max_rank: int = Field(
        default=0,
        ge=0,
        description="Factor rows kept per example (its top eigen-directions); 0 keeps all. "
        "Bounds the statistics at N x max_rank x width floats.",
    )
    sketch_seed: int = Field(
        default=0,
        description="Seed of the projection: fixed, so a re-run or another budget sees the same "
        "sketch (a warm start needs the same one).",
    )
    chunk_examples: int = Field(
        default=4096,
        gt=0,
        description="Examples per chunk on disk: the unit of streaming and of resuming.",
    )
    # Workers beyond the number of chunks idle: a pool of P examples keeps P / chunk_examples
    # busy; the pool is the one a single process makes.
    num_processes: int = Field(
        default=1,
        gt=0,
        description="> 1: that many processes via `accelerate launch` (GPUs: one each; CPU: "
        "gloo), each computing every N-th missing chunk.",
    )
    # The label factor is each example's factor of Σ_j w_j x_j x_jᵀ, w = ‖p − e_y‖²
    # (embedding/stats.py), kept beside the unchanged plain statistics.
    token_weight: Literal["none", "label"] = Field(
        default="label",
        description="label: also store label-weighted statistics for fisher-label (costs a "
        "vocabulary softmax per loss token and a second factor per example); none: skip them.",
    )
