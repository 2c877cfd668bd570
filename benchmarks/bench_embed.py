"""Throughput of the embedding pass against a plain `model(**batch)` loop, side by side.

    python benchmarks/bench_embed.py                      # stories260K, 2,000 GSM8K examples
    python benchmarks/bench_embed.py --model <id|path> --examples 5000 --device cuda

Both loops see the same tokenised examples and count real (unpadded) tokens per second:
- plain loop: batches of --batch-size examples in file order, padded to the longest, under
  torch.inference_mode — what one writes first;
- plain loop on the pass's own length-sorted batches (same padding as the pass, no
  statistics): isolates the cost of forming the statistics;
- the pass itself (steps.selection.embed.embed_encoded): length-sorted batches, loss-token states,
  factors and per-token losses, written to disk in chunks.
Each is run twice and the faster run kept (the first warms caches and allocators).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from steps.modeling import (
    Encoded,
    ModelConfig,
    autocast,
    encode_examples,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
    resolve_precision,
)
from steps.selection.embed import EmbedConfig, embed_encoded

REPO = Path(__file__).resolve().parents[1]


def read_pool(path: Path, examples: int) -> tuple[list[str], list[str]]:
    prompts, responses = [], []
    with path.open() as handle:
        for line, _ in zip(handle, range(examples), strict=False):
            record = json.loads(line)
            prompts.append(record["question"])
            responses.append(record["answer"])
    return prompts, responses


def plain_loop(
    model, batches: list[list[Encoded]], pad_id: int, device: str, precision: str
) -> tuple[float, int]:
    """Seconds and padded positions of model(**batch) over the batches."""
    padded = 0
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for examples in batches:
            batch = {k: v.to(device) for k, v in pad_batch(examples, pad_id).items()}
            batch.pop("labels")
            model(**batch)
            padded += batch["input_ids"].numel() - sum(len(e.input_ids) for e in examples)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/stories260K"))
    parser.add_argument("--data", default=str(REPO / "assets/data/gsm8k/train.jsonl"))
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32, help="plain loop, examples")
    parser.add_argument("--batch-tokens", type=int, default=EmbedConfig().batch_tokens)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()
    precision = resolve_precision(args.precision, args.device)

    model_config = ModelConfig(name=args.model)
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, args.device).eval()
    encoded = encode_examples(tokenizer, *read_pool(Path(args.data), args.examples), model_config)
    tokens = sum(len(e.input_ids) for e in encoded)
    pad_id = tokenizer.pad_token_id
    config = EmbedConfig(batch_tokens=args.batch_tokens)

    file_order = [encoded[a : a + args.batch_size] for a in range(0, len(encoded), args.batch_size)]
    lengths = [len(e.input_ids) for e in encoded]
    sorted_batches = [
        [encoded[i] for i in rows] for rows in length_sorted_batches(lengths, args.batch_tokens)
    ]
    results: dict[str, tuple[float, float]] = {}
    for _ in range(2):
        for name, batches in [
            ("plain loop, file order", file_order),
            ("plain loop, length-sorted", sorted_batches),
        ]:
            seconds, padded = plain_loop(model, batches, pad_id, args.device, precision)
            if name not in results or seconds < results[name][0]:
                results[name] = (seconds, padded / (padded + tokens))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            ref = embed_encoded(model, encoded, pad_id, config, Path(out), args.device, precision)
            seconds = time.perf_counter() - start
        name = "embed pass (statistics to disk)"
        if name not in results or seconds < results[name][0]:
            results[name] = (seconds, ref.padding_fraction)

    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"# bench_embed: {args.model}, {len(encoded)} examples, {tokens} tokens, {device}, "
        f"{precision}\n"
    )
    print("| loop | seconds | tokens/s | padding | vs plain, file order |")
    print("|---|---:|---:|---:|---:|")
    baseline = results["plain loop, file order"][0]
    for name, (seconds, padding) in results.items():
        print(
            f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {padding:.1%} "
            f"| {baseline / seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()
