"""Throughput of the embedding pass against a plain `model(**batch)` loop, side by side.

    python benchmarks/bench_embed.py                      # stories260K, 2,000 GSM8K examples
    python benchmarks/bench_embed.py --model <id|path> --examples 5000 --device cuda  # bf16
    python benchmarks/bench_embed.py --processes 2 --chunk-examples 250  # + embed_pool, 2 procs
    python benchmarks/bench_embed.py --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt-format chat --max-length 256 --examples 32 --batch-size 16 \
        --batch-tokens 4096 --precision bf16 --threads 1     # a GGUF: converted once, .sift/gguf/

--model is what model.name takes (a folder, a hub id, a .gguf file: benchmarks/model_arguments.py);
--precision auto resolves as model.precision does (bf16 on CPUs with bf16 instructions for
models of hidden size >= 256). --threads sets torch's CPU threads (default: torch's own).

Both loops see the same tokenised examples and count real (unpadded) tokens per second:
- plain loop: batches of --batch-size examples in file order, padded to the longest, under
  torch.inference_mode — what one writes first;
- plain loop on the pass's own length-sorted batches (same padding as the pass, no
  statistics): isolates the cost of forming the statistics;
- the pass itself (steps.selection.embedding.embed.embed_encoded): length-sorted batches,
  loss-token states, factors and per-token losses, written to disk in chunks; once with
  embed.token_weight=none (the plain statistics) and once with =label (the default:
  fisher-label's ‖p − e_y‖²-weighted factors too, a vocabulary softmax per loss token);
- with --processes N: embed_pool with embed.num_processes=N
  (steps/selection/embedding/multiprocess.py), timed from the call (worker start-up and model
  loading included) and by the workers' own loops (FeaturesRef.tokens_per_second); needs at
  least N chunks (--chunk-examples).
Each is run --repeats times (default 2), the arms in turn, and the fastest run kept (the first
warms caches and allocators); beside wall seconds, the process's CPU seconds (best of the
repeats; one thread: what neighbours on a shared box disturb least, as bench_evaluate.py does).
MFU = real tokens/s × forward FLOPs per token ÷ --peak-tflops (default on CUDA: 989, dense
bf16 of an H100/H200 SXM; on CPU only when given), with forward FLOPs ≈ 2 × the parameters
that multiply (all but the input-embedding lookup; a tied output head counts): attention's
own 4·L·T·d per token is left out, as the brief estimate 2N does.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from model_arguments import add_model_arguments, benchmark_model, benchmark_precision

from steps.hardware import autocast
from steps.modeling import (
    Encoded,
    encode_examples,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_batch,
)
from steps.selection.embedding.embed import EmbedConfig, embed_encoded, embed_pool

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


def forward_flops_per_token(model: torch.nn.Module) -> float:
    """2 × the parameters that multiply: all but the input-embedding lookup (a tied output head,
    which shares that matrix, still multiplies once per token)."""
    embedding = model.get_input_embeddings().weight  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    matmul = sum(p.numel() for p in model.parameters() if p is not embedding)
    if head is not None and head.weight is embedding:
        matmul += embedding.numel()
    return 2.0 * matmul


def write_table(prompts: list[str], responses: list[str], path: Path) -> str:
    """The pool as the embed step reads it (the validated table's id, prompt, response)."""
    ids = [f"gsm8k-{i}" for i in range(len(prompts))]
    pd.DataFrame({"id": ids, "prompt": prompts, "response": responses}).to_parquet(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "assets/models/stories260K"))
    parser.add_argument("--data", default=str(REPO / "assets/data/gsm8k/train.jsonl"))
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32, help="plain loop, examples")
    parser.add_argument("--batch-tokens", type=int, default=EmbedConfig().batch_tokens)
    parser.add_argument("--chunk-examples", type=int, default=EmbedConfig().chunk_examples)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--processes", type=int, default=1, help="> 1: also embed_pool in N")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (CUDA: 989)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm; best kept")
    add_model_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = benchmark_model(args.model, args)
    precision = benchmark_precision(args.precision, args.device, model_config)
    peak = args.peak_tflops or (989.0 if args.device == "cuda" else None)

    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, args.device).eval()
    prompts, responses = read_pool(Path(args.data), args.examples)
    encoded = encode_examples(tokenizer, prompts, responses, model_config)
    # embed_pool refuses examples whose prompt fills max_length (no response token left)
    kept = [i for i, e in enumerate(encoded) if e.n_loss_tokens > 0]
    prompts, responses = [prompts[i] for i in kept], [responses[i] for i in kept]
    encoded = [encoded[i] for i in kept]
    tokens = sum(len(e.input_ids) for e in encoded)
    pad_id = tokenizer.pad_token_id
    config = EmbedConfig(
        batch_tokens=args.batch_tokens, chunk_examples=args.chunk_examples, token_weight="none"
    )
    passes = {
        "embed pass, token_weight=none (statistics to disk)": config,
        "embed pass, token_weight=label (the default)": config.model_copy(
            update={"token_weight": "label"}
        ),
    }

    file_order = [encoded[a : a + args.batch_size] for a in range(0, len(encoded), args.batch_size)]
    lengths = [len(e.input_ids) for e in encoded]
    sorted_batches = [
        [encoded[i] for i in rows] for rows in length_sorted_batches(lengths, args.batch_tokens)
    ]
    results: dict[str, tuple[float, float]] = {}
    cpu_seconds: dict[str, float] = {}  # the in-process arms only

    def keep(name: str, seconds: float, padding: float, cpu: float | None = None) -> None:
        if name not in results or seconds < results[name][0]:
            results[name] = (seconds, padding)
        if cpu is not None:
            cpu_seconds[name] = min(cpu, cpu_seconds.get(name, math.inf))

    for _ in range(args.repeats):
        for name, batches in [
            ("plain loop, file order", file_order),
            ("plain loop, length-sorted", sorted_batches),
        ]:
            cpu = time.process_time()
            seconds, padded = plain_loop(model, batches, pad_id, args.device, precision)
            keep(name, seconds, padded / (padded + tokens), time.process_time() - cpu)
        for name, weighted in passes.items():
            with tempfile.TemporaryDirectory() as out:
                start, cpu = time.perf_counter(), time.process_time()
                ref = embed_encoded(
                    model, encoded, pad_id, weighted, Path(out), args.device, precision
                )
                keep(
                    name,
                    time.perf_counter() - start,
                    ref.padding_fraction,
                    time.process_time() - cpu,
                )
    if args.processes > 1:
        chunks = math.ceil(len(encoded) / args.chunk_examples)
        if chunks < args.processes:
            print(
                f"warning: {chunks} chunk(s) for {args.processes} processes: lower --chunk-examples"
            )
        many = config.model_copy(update={"num_processes": args.processes})
        with tempfile.TemporaryDirectory() as out:
            table = write_table(prompts, responses, Path(out) / "pool.parquet")
            for attempt in range(2):
                start = time.perf_counter()
                ref = embed_pool(
                    table, model_config, many, Path(out) / f"f{attempt}", args.device, precision
                )
                name = f"embed_pool, {args.processes} processes"
                keep(
                    f"{name}: wall, launch included",
                    time.perf_counter() - start,
                    ref.padding_fraction,
                )
                keep(
                    f"{name}: workers' loops", tokens / ref.tokens_per_second, ref.padding_fraction
                )

    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    per_token = forward_flops_per_token(model)
    print(
        f"# bench_embed: {args.model}, {len(encoded)} examples, {tokens} tokens, {device}, "
        f"{precision}, {per_token / 2e6:.2f}M multiplying parameters"
        + (f", MFU against {peak:g} TFLOP/s" if peak else "")
        + "\n"
    )
    mfu_header = " MFU |" if peak else ""
    print(
        "| loop | seconds | tokens/s | padding | vs plain, file order "
        f"| vs plain, same batches | CPU s | vs plain, same batches, by CPU s |{mfu_header}"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""))
    baseline = results["plain loop, file order"][0]
    same_batches = results["plain loop, length-sorted"][0]
    same_batches_cpu = cpu_seconds["plain loop, length-sorted"]
    for name, (seconds, padding) in results.items():
        rate = tokens / seconds
        mfu = f" {rate * per_token / (peak * 1e12):.2%} |" if peak else ""
        used = cpu_seconds.get(name)
        by_cpu = ("| – | – |" if used is None
                  else f"| {used:.2f} | {same_batches_cpu / used:.2f}x |")  # fmt: skip
        print(
            f"| {name} | {seconds:.2f} | {rate:,.0f} | {padding:.1%} "
            f"| {baseline / seconds:.2f}x | {same_batches / seconds:.2f}x {by_cpu}{mfu}"
        )
    none, label = passes
    vocabulary = model.get_output_embeddings().weight.shape[0]
    print(
        f"\ntoken_weight=label / none: {results[none][0] / results[label][0]:.2f}x the tokens/s "
        f"({cpu_seconds[none] / cpu_seconds[label]:.2f}x by CPU time; a softmax over "
        f"{vocabulary:,} vocabulary entries per loss token)"
    )


if __name__ == "__main__":
    main()
