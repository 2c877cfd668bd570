"""fp32 against bf16 autocast on the CPU: training and forward tokens/s, and the loss curve.

    python benchmarks/bench_precision.py                                 # stories260K
    python benchmarks/bench_precision.py --model llama-3m --label llama-3m-random  # hidden 256
    python benchmarks/bench_precision.py --model <SmolLM2's converted folder> --label smollm2-135m

Two copies of the same model, the same seed, the same GSM8K batches (Sift's prompt template and
completion-only labels, padded as the fine-tune step pads them), AdamW at the same settings. The
arms alternate step by step (fp32 step 1, bf16 step 1, fp32 step 2, ...), so load from other
processes falls on both alike. bf16 is what `model.precision: bf16` runs: fp32 weights and
optimizer, matmuls under torch.autocast(cpu, bfloat16), as Trainer(bf16=True) does on a CPU.
tokens/s counts real (non-padding) tokens over the wall time of the steps after the first
(warm-up); the forward pass (what embed and evaluate run) is timed the same way, under no_grad.
Prints a table with bf16/fp32 ratios, the two loss curves and their largest gap, and writes
JSON to --out-dir (docs/results/precision/<label>.json: the figures the docs quote).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "assets" / "models" / "stories260K"
GSM8K = REPO / "assets" / "data" / "gsm8k" / "train.jsonl"


@dataclass
class Arm:
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    forward_seconds: list[float] = field(default_factory=list)

    def autocast(self) -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")


def batches(model_dir: Path, rows: int, batch_size: int, max_length: int) -> list[dict]:
    from steps.modeling import ModelConfig, encode_examples, load_tokenizer, pad_batch

    config = ModelConfig(name=str(model_dir), max_length=max_length)
    tokenizer = load_tokenizer(config)
    frame = pd.read_json(GSM8K, lines=True).head(rows)
    encoded = encode_examples(tokenizer, list(frame.question), list(frame.answer), config)
    pad_id = int(tokenizer.pad_token_id)
    return [
        pad_batch(encoded[start : start + batch_size], pad_id)
        for start in range(0, len(encoded) - batch_size + 1, batch_size)
    ]


def arm(model_dir: Path, precision: str, lr: float) -> Arm:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return Arm(precision, model, optimizer)


def train_step(one: Arm, batch: dict) -> None:
    started = time.perf_counter()
    with one.autocast():
        loss = one.model(**batch).loss
    loss.backward()
    one.optimizer.step()
    one.optimizer.zero_grad(set_to_none=True)
    one.train_seconds.append(time.perf_counter() - started)
    one.losses.append(float(loss.detach()))


def forward_pass(one: Arm, batch: dict) -> None:
    started = time.perf_counter()
    with torch.no_grad(), one.autocast():
        one.model(**batch)
    one.forward_seconds.append(time.perf_counter() - started)


def rate(tokens: list[int], seconds: list[float]) -> float:
    """tokens/s over every step but the first (warm-up: allocations, oneDNN kernel choice)."""
    return sum(tokens[1:]) / sum(seconds[1:])


def _model_dir(name: str) -> Path:
    """A folder as given, or one of bench_finetune's random-init Llamas, built afresh."""
    from bench_finetune import LLAMA_SIZES, build_model

    return build_model(name, Path(tempfile.mkdtemp())) if name in LLAMA_SIZES else Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=str(STORIES),
        help="a transformers folder, or llama-3m|llama-30m|llama-125m (random init, built here)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="training steps per arm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--label", help="the model's name in the output (default: its folder's)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results" / "precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = _model_dir(args.model)

    data = batches(model_dir, args.steps * args.batch_size, args.batch_size, args.max_length)
    tokens = [int(batch["attention_mask"].sum()) for batch in data]
    arms = [arm(model_dir, precision, args.lr) for precision in ("fp32", "bf16")]
    for batch in data:
        for one in arms:
            train_step(one, batch)
    for one in arms:
        one.model.eval()
    for batch in data:
        for one in arms:
            forward_pass(one, batch)

    fp32, bf16 = arms
    train = {one.precision: rate(tokens, one.train_seconds) for one in arms}
    forward = {one.precision: rate(tokens, one.forward_seconds) for one in arms}
    gap = max(abs(a - b) for a, b in zip(fp32.losses, bf16.losses, strict=True))
    cpu_flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    result = {
        "model": args.model,
        "parameters": sum(p.numel() for p in fp32.model.parameters()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
        "native_bf16": "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags,
        "tokens_per_step": tokens,
        "train_tokens_per_s": train,
        "forward_tokens_per_s": forward,
        "train_ratio_bf16": train["bf16"] / train["fp32"],
        "forward_ratio_bf16": forward["bf16"] / forward["fp32"],
        "loss": {one.precision: one.losses for one in arms},
        "largest_loss_gap": gap,
    }
    label = args.label or model_dir.name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{label}: {result['parameters']:,} parameters, {args.steps} steps of "
          f"{args.batch_size}x<={args.max_length} tokens, {args.threads} thread(s), native bf16 "
          f"{result['native_bf16']}")  # fmt: skip
    print(f"{'':8}{'train tok/s':>12}{'forward tok/s':>15}")
    for one in arms:
        print(f"{one.precision:8}{train[one.precision]:12.1f}{forward[one.precision]:15.1f}")
    print(
        f"{'bf16/fp32':8}{result['train_ratio_bf16']:11.2f}x{result['forward_ratio_bf16']:14.2f}x"
    )
    print("step  " + "  ".join(f"{i + 1:>7}" for i in range(len(tokens))))
    for one in arms:
        print(f"{one.precision:6}" + "  ".join(f"{loss:7.4f}" for loss in one.losses))
    print(f"largest loss gap over the steps: {gap:.4f} nats; JSON: {path}")


if __name__ == "__main__":
    main()
