"""The model a benchmark runs on, named as `model.name` is: a local folder, a hub id, or a GGUF
file (SmolLM2's: `make smollm2`), converted once by steps/gguf.py into this checkout's
.sift/gguf/ (the folder `sift run` from the repository root converts it to, so a benchmark and
a run share one conversion). Not a benchmark itself: the bench_*.py scripts import it
(benchmarks/ is their sys.path[0]).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, get_args

from steps.hardware import model_width, resolve_precision
from steps.modeling import ModelConfig, PromptFormat, model_source

REPO = Path(__file__).resolve().parents[1]
STATE_DIR = REPO / ".sift"  # where model_source converts a GGUF (the project's state folder)


def add_model_arguments(parser: argparse.ArgumentParser, max_length: int | None = None) -> None:
    """--max-length and --prompt-format: how examples are shown to a --model (ModelConfig's)."""
    defaults = ModelConfig()
    parser.add_argument(
        "--max-length",
        type=int,
        default=max_length or defaults.max_length,
        help="tokens per example (model.max_length)",
    )
    parser.add_argument(
        "--prompt-format",
        choices=get_args(PromptFormat),
        default=defaults.prompt_format,
        help="model.prompt_format: chat for an Instruct model such as SmolLM2",
    )


def benchmark_model(name: str, args: argparse.Namespace | None = None) -> ModelConfig:
    """The ModelConfig a step would load for model.name=`name` (a GGUF: its converted folder),
    with --max-length and --prompt-format where the script has them."""
    settings: dict[str, Any] = {"name": name}
    for option, field in (("max_length", "max_length"), ("prompt_format", "prompt_format")):
        if args is not None and getattr(args, option, None) is not None:
            settings[field] = getattr(args, option)
    return model_source(ModelConfig(**settings), STATE_DIR).config


def benchmark_precision(precision: str, device: str, config: ModelConfig) -> str:
    """--precision resolved as model.precision is: auto picks by device and the model's width."""
    return resolve_precision(precision, device, model_width(config))  # type: ignore[arg-type]
