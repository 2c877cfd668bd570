"""Where a run computes: model.device and model.precision resolved once, at the edge.

Embed, fine-tune and evaluate all take the resolved values (and every cache key covers them),
so one run computes in one precision throughout."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from steps.gguf import gguf_width, named_checkpoint, names_gguf
from steps.modeling import Device, ModelConfig, Precision


def resolve_device(device: Device) -> str:
    """'auto' means CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is visible to torch")
    return device


# bf16 autocast on a CPU, measured with benchmarks/bench_precision.py (docs/results/benchmarks.md,
# "Precision on the CPU"): on a CPU with bf16 instructions, training ran 1.64x (hidden size
# 256), 1.95x (512) and 1.80x (SmolLM2-135M, 576) as fast as fp32, the loss curves within
# 0.008 nats of each other over 8 steps; at hidden size 64 (stories260K) the casts cost more
# than the narrow matmuls save (0.86x). Without the instructions bf16 is emulated, and slow.
CPU_BF16_MIN_WIDTH = 256
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # Linux /proc/cpuinfo flag names


def cpu_has_native_bf16() -> bool:
    """The CPU lists bf16 instructions (AVX512-BF16 or AMX-BF16). Read from Linux's
    /proc/cpuinfo; elsewhere False, so `auto` stays fp32 there."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and not CPU_BF16_FLAGS.isdisjoint(cpuinfo.read_text().split())


def resolve_precision(precision: Precision, device: str, width: int | None = None) -> str:
    """'auto' is bf16 on GPUs that support it, and on CPUs with bf16 instructions for models
    at least CPU_BF16_MIN_WIDTH wide (`width`: the hidden size); fp32 elsewhere."""
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise ValueError("model.precision 'fp16' needs a CUDA device; use fp32 or bf16 on CPU")
        return precision
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device == "cpu" and width is not None and width >= CPU_BF16_MIN_WIDTH:
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def model_width(config: ModelConfig) -> int | None:
    """The model's hidden size from its config (a GGUF: its embedding table), no weights
    loaded; None where it cannot be read (a hub model neither cached nor reachable)."""
    if names_gguf(config.name, config.gguf_file):
        return gguf_width(named_checkpoint(config.name, config.gguf_file, config.revision))
    try:
        loaded = AutoConfig.from_pretrained(
            config.name, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError):
        return None
    width = getattr(loaded, "hidden_size", None)
    return width if isinstance(width, int) else None


def resolve_hardware(config: ModelConfig) -> tuple[str, str]:
    """model.device and model.precision resolved once, at the edge: (device, precision).

    Embed, fine-tune and evaluate all take these resolved values, so one run computes in one
    precision throughout."""
    device = resolve_device(config.device)
    cpu_auto = device == "cpu" and config.precision == "auto" and cpu_has_native_bf16()
    width = model_width(config) if cpu_auto else None
    return device, resolve_precision(config.precision, device, width)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str, precision: str) -> torch.autocast:
    """Mixed precision for inference (embed, evaluate): fp32 weights, matmuls in `precision`.

    Fine-tuning gets the same precision through Trainer's bf16/fp16 arguments."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(
        torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None
    )
