"""How faithful the embed step's sketch is at d=768: picks made on sketched statistics, scored
on the exact objective; prints a markdown table and the smallest sketch size that keeps 99.5%.

    python benchmarks/bench_sketch.py            # N=1,000, k=100: 6 minutes on one core, 3.9 GB
    python benchmarks/bench_sketch.py --quick    # N=300, k=30: under 2 minutes
    python benchmarks/bench_sketch.py --n 2000 --k 200
    python benchmarks/bench_sketch.py --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt-format chat --max-length 256 --quick      # a trained model's states (d=576)

Quality = exact f(S) - f(empty) of the k `fisher` picks made on a sketch (EmbedConfig.sketch_dim
in `--dims`) over that of the picks made on the exact statistics; overlap = the share of the
exact picks the sketch also picks. Two pools of N examples at d=768 (or --model's width):
- GSM8K: the first N bundled training examples through a seeded random-init llama of width 768
  (2 layers, 12 heads, stories260K's tokenizer), or through --model (what model.name takes: a
  folder, a hub id, a .gguf file converted once by benchmarks/model_arguments.py; d is then its
  hidden size, and the synthetic pool's too), embedded by the repo's embed step with no sketch
  (in --precision, fp32 unless given); each sketch is `project` of those statistics with the
  embed step's own seed, which is what embed_pool with that sketch_dim stores (checked here on
  the first examples). The pass runs with embed.token_weight=none: `fisher` reads the plain
  factors, which the label weights (a softmax over the vocabulary per loss token) leave as
  they are;
- synthetic: benchmarks/bench_select.py's realistic-spectrum pool (power law, 16 topics).
Seconds are the sketch's project + select, one thread.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_select import synthetic_pool  # benchmarks/ is this script's sys.path[0]
from model_arguments import add_model_arguments, benchmark_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from steps.data.ingest import IngestConfig, normalise, write_table
from steps.data.sources import read_source
from steps.modeling import ModelConfig, encode_examples, load_tokenizer
from steps.selection.embedding.embed import FILES, EmbedConfig, embed_pool, load_pool
from steps.selection.pool import FeaturePool, project
from steps.selection.selectors import fisher_objective, select

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "assets/models/stories260K"
SOURCE = REPO / "assets/data/gsm8k/train.jsonl"
WIDTH = 768
QUALITY_BAR = 0.995  # within 0.5% of the exact picks' information gain
# 0: never projected; fisher reads only the plain factors, so no label-weighted ones
EXACT = EmbedConfig(sketch_dim=0, batch_tokens=4096, token_weight="none")


def random_llama(model_dir: Path) -> ModelConfig:
    """A seeded random-init llama of width 768 with the bundled tokenizer, saved to model_dir:
    the hidden size of a small production model, without downloading one."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    settings = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=12,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(settings).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return ModelConfig(name=str(model_dir))


def pool_table(n: int, model: ModelConfig, path: Path) -> str:
    """The first n GSM8K training rows with a loss-bearing response token, as the validated
    table the embed step reads (as bench_select.gsm8k_pool builds it)."""
    fields = IngestConfig(source=str(SOURCE), prompt_field="question", response_field="answer")
    table = normalise(read_source(str(SOURCE), "train", None, REPO), fields, str(SOURCE), "train")
    encoded = encode_examples(
        load_tokenizer(model), list(table.prompt), list(table.response), model
    )
    write_table(table[[e.n_loss_tokens > 0 for e in encoded]].head(n), path)
    return str(path)


def in_memory(pool: FeaturePool) -> FeaturePool:
    """A copy of a pool memory-mapped from a folder about to be deleted."""
    return FeaturePool(**{name: np.array(getattr(pool, name)) for name in FILES})


def gsm8k_pool(
    n: int, dims: list[int], model: ModelConfig, precision: str, work: Path
) -> FeaturePool:
    """Exact statistics (d = the model's width) of n GSM8K examples; asserts that projecting them
    gives, Gram for Gram, the statistics embed_pool stores with each sketch_dim in `dims` (first
    16 examples)."""
    table = pool_table(n, model, work / "pool.parquet")
    exact = in_memory(load_pool(embed_pool(table, model, EXACT, work / "exact", "cpu", precision)))
    check = pool_table(min(n, 16), model, work / "check.parquet")
    head = exact.subset(np.arange(min(n, 16)))
    for dim in dims:
        config = EXACT.model_copy(update={"sketch_dim": dim})
        stored = load_pool(embed_pool(check, model, config, work / f"s{dim}", "cpu", precision))
        projected = project(head, dim, config.sketch_seed)
        for i, (got, want) in enumerate(zip(grams(stored), grams(projected), strict=True)):
            error = np.abs(got - want).max() / np.abs(want).max()
            assert error <= 1e-3, f"sketch {dim}, example {i}: {error:.1e} off the projection"
    return exact


def grams(pool: FeaturePool) -> list[np.ndarray]:
    """Each example's FᵀF in float64 (a factor is unique only up to a rotation)."""
    blocks = (pool.factors[a:b].astype(np.float64) for a, b in itertools.pairwise(pool.offsets))
    return [block.T @ block for block in blocks]


def measure(source: str, pool: FeaturePool, k: int, dims: list[int]) -> list[tuple]:
    """(source, sketch, quality, overlap, seconds) for the exact pool and each sketch of it."""
    empty = fisher_objective(pool, [])
    seed = EmbedConfig().sketch_seed
    start = time.perf_counter()
    exact = select(pool, k, "fisher", threads=1).order
    rows = [(source, f"exact ({pool.d})", 1.0, 1.0, time.perf_counter() - start)]
    best = fisher_objective(pool, exact) - empty
    print(f"{source}: exact fisher in {rows[0][-1]:.1f} s", flush=True)
    for dim in dims:
        start = time.perf_counter()
        picks = select(project(pool, dim, seed), k, "fisher", threads=1).order
        seconds = time.perf_counter() - start
        quality = (fisher_objective(pool, picks) - empty) / best
        overlap = len(np.intersect1d(picks, exact)) / k
        rows.append((source, str(dim), quality, overlap, seconds))
        print(f"{source}: sketch {dim} quality {quality:.4f} in {seconds:.1f} s", flush=True)
    return rows


def smallest_faithful(rows: list[tuple], dims: list[int]) -> int | None:
    """The smallest sketch size at and above which every source keeps QUALITY_BAR."""
    passing = {dim: all(q >= QUALITY_BAR for _, s, q, *_ in rows if s == str(dim)) for dim in dims}
    above = [dim for i, dim in enumerate(dims) if all(passing[d] for d in dims[i:])]
    return above[0] if above else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="examples per pool")
    parser.add_argument("--k", type=int, default=100, help="budget")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--quick", action="store_true", help="N=300, k=30")
    parser.add_argument("--model", default=None, help="model.name (default: a random llama-768)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="embed")
    add_model_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.n, args.k = 300, 30
    dims = sorted(args.dims)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        if args.model is None:
            name, label = random_llama(Path(work) / "model").name, f"random llama-{WIDTH}"
        else:
            name, label = args.model, Path(args.model).name
        model = benchmark_model(name, args)  # shown as --max-length and --prompt-format say
        real = gsm8k_pool(args.n, dims, model, args.precision, Path(work))
    t, width = real.n_tokens, real.d
    tokens = f"GSM8K loss tokens per example: {t.min()}-{t.max()}, median {np.median(t):.0f}"
    rows = measure(f"GSM8K, {label}", real, args.k, dims)
    del real
    rows += measure("synthetic (bench_select)", synthetic_pool(args.n, width, seed=2), args.k, dims)
    print(
        f"\n## sketch faithfulness: N={args.n}, d={width}, k={args.k}, one thread, "
        f"{args.precision} embedding\n"
    )
    print(f"({tokens})\n")
    print("| source | sketch dim | quality | overlap with exact picks | seconds |")
    print("|---|---:|---:|---:|---:|")
    for source, sketch, quality, overlap, seconds in rows:
        print(f"| {source} | {sketch} | {quality:.4f} | {overlap:.2f} | {seconds:.1f} |")
    smallest = smallest_faithful(rows, dims)
    print(f"\nsmallest sketch with quality >= {QUALITY_BAR} on every source: {smallest}")


if __name__ == "__main__":
    main()
