"""Time and memory of FisherSFT selection on synthetic and real pools; prints markdown tables.

    python benchmarks/bench_select.py --quick          # about a minute
    python benchmarks/bench_select.py                  # d=64, N=5000, k=500 (+ 2N) and d=768
    python benchmarks/bench_select.py --straightforward  # + the slogdet-loop reference (slow)
    python benchmarks/bench_select.py --backends-only  # numpy vs torch (cpu) side by side
    python benchmarks/bench_select.py --exact 10000 --k-exact 1000  # exact d=768, own process
    python benchmarks/bench_select.py --exact 1000 --versus-unscreened  # the screen's ratio
On a GPU machine (`--backend torch --device cuda`; the picks are asserted equal to numpy's in
the side-by-side runs, tests/model/test_gpu.py checks them on CUDA):
    python benchmarks/bench_select.py --backends-only --device cuda
    python benchmarks/bench_select.py --large-only --n-large 1000000 --k-large 10000 \
        --backend torch --device cuda --device-memory-mb 16000  # sketched: 4 GB of statistics
    python benchmarks/bench_select.py --exact 100000 --k-exact 10000 --backend torch \
        --device cuda --device-memory-mb 100000 --pool-dir /tmp  # 49 GB of exact factors

0. Backends: `fisher` on the numpy design and on the torch design (`--device`), same pool,
   same picks asserted, the time ratio printed (N=--n at d=--d, and exact d=768 at --n-768).
1. `fisher` (lazy greedy) against `plain_greedy_fisher` in the same process, asserting they
   pick the same examples, on a synthetic pool and on the real GSM8K pool embedded by
   stories260K (`--gsm8k N` rows, 5,000 by default, k = N/10). 2. `fisher` as N doubles with
   k = N/10. 3. d=768: exact `fisher` against `fisher` on random-projection sketches
   (`project`), scored by the exact objective.
4. At scale (child process, its own peak RSS): N=100k, d=768, k=10k from the statistics the
   embed step keeps with EmbedConfig(sketch_dim=64, max_rank=16).
Synthetic pools: T ~ U[64, 256] loss tokens per example; states = (example mean + token noise)
under a power-law spectrum (1 + j)^-0.75, rotated by one of 16 random "topic" bases. Seconds
are from an untraced call; peak memory is tracemalloc's peak over a second call (numpy buffers
included), on top of the pool itself (for plain greedy, a call with k/20: its memory does not
grow).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from steps.selection.baselines import first_best
from steps.selection.greedy.design import Design
from steps.selection.greedy.settings import GreedySettings
from steps.selection.greedy.torch_design import TorchDesign
from steps.selection.pool import FeaturePool, factor_from_tokens, project, random_projection
from steps.selection.selectors import (
    DEFAULT_RIDGE,
    Selection,
    default_threads,
    fisher_objective,
    plain_greedy_fisher,
    select,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic_pool(
    n: int, d: int, seed: int, topics: int = 16, path: Path | None = None
) -> FeaturePool:
    """n examples of T ~ U[64, 256] d-dim token states, each example drawn from one of
    `topics` random rotations of a power-law spectrum, so no single direction set covers all.

    The factors are written as they are drawn (the pool_from_tokens of the states), into a
    memory-mapped .npy at `path` when given: an exact d=768 pool is 0.5 GB per 1,000 examples.
    """
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(d)) ** -0.75
    bases = [np.linalg.qr(rng.standard_normal((d, d)))[0] * scale for _ in range(topics)]
    lengths, topic = rng.integers(64, 257, size=n), rng.integers(topics, size=n)
    offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, d))]).astype(np.int64)
    shape = (int(offsets[-1]), d)
    factors = (
        np.lib.format.open_memmap(path, "w+", np.float32, shape)
        if path is not None
        else np.empty(shape, np.float32)
    )
    pooled = np.empty((n, d), np.float32)
    for i, (t, base) in enumerate(zip(lengths, topic, strict=True)):
        x = rng.standard_normal(d) + rng.standard_normal((t, d))  # example mean + token noise
        states = (x @ bases[base]).astype(np.float32)
        factors[offsets[i] : offsets[i + 1]] = factor_from_tokens(states)
        pooled[i] = states.astype(np.float64).mean(axis=0)
    return FeaturePool(factors, offsets, pooled, lengths.astype(np.int64))


def sketched_pool(n: int, d: int, dim: int, rank: int, seed: int, topics: int = 16) -> FeaturePool:
    """The statistics the embed step stores for a d-wide model with EmbedConfig(sketch_dim=dim,
    max_rank=rank), for states drawn as in synthetic_pool: projected states P^T x are sampled
    directly from their projected distribution, so no (T, d) state is ever formed."""
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(d)) ** -0.75
    p = random_projection(d, dim, seed).astype(np.float64)
    maps = np.stack(
        [(np.linalg.qr(rng.standard_normal((d, d)))[0] * scale) @ p for _ in range(topics)]
    )
    lengths, topic = rng.integers(64, 257, size=n), rng.integers(topics, size=n)
    factors = np.empty((n, rank, dim), np.float32)
    pooled = np.empty((n, dim), np.float32)
    for t in np.unique(lengths):
        group = np.flatnonzero(lengths == t)
        z = rng.standard_normal((len(group), 1, d)) + rng.standard_normal((len(group), t, d))
        x = z @ maps[topic[group]]  # (n_t, t, dim): the projected token states
        w, u = np.linalg.eigh(x.transpose(0, 2, 1) @ x)
        top_w, top_u = np.clip(w[:, -rank:][:, ::-1], 0, None), u[:, :, -rank:][:, :, ::-1]
        factors[group] = np.sqrt(top_w)[:, :, None] * top_u.transpose(0, 2, 1)
        pooled[group] = x.mean(axis=1)
    return FeaturePool(
        factors=factors.reshape(n * rank, dim),
        offsets=np.arange(0, (n + 1) * rank, rank, dtype=np.int64),
        pooled=pooled,
        n_tokens=lengths.astype(np.int64),
    )


def straightforward_greedy(pool: FeaturePool, k: int, ridge: float) -> np.ndarray:
    """The objective as written, one candidate at a time: argmax_i slogdet(V + G_i)."""
    grams = [
        f.T.astype(np.float64) @ f.astype(np.float64)
        for f in (
            pool.factors[a:b] for a, b in zip(pool.offsets[:-1], pool.offsets[1:], strict=True)
        )
    ]
    v = ridge * np.eye(pool.d)
    chosen: list[int] = []
    for _ in range(k):
        scores = np.full(pool.N, -np.inf)
        current = np.linalg.slogdet(v)[1]
        for i in range(pool.N):
            if i not in chosen:  # the gain, so that the tie rule sees the same scale as select
                scores[i] = np.linalg.slogdet(v + grams[i])[1] - current
        pick = first_best(scores)
        chosen.append(pick)
        v += grams[pick]
    return np.array(chosen)


@dataclass
class Run:
    selection: Selection
    seconds: float
    peak_mb: float
    gain_evaluations: int  # float64 gains and float32 screens, the first pass included
    float64_gains: int = 0


DESIGN_CLASSES = (Design, TorchDesign)


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Counts of float64 gains and float32 screens evaluated inside the block, by wrapping
    the designs' methods (benchmark only; restored on exit)."""
    counts = {"gains": 0, "screen": 0}
    originals = [(cls, name, getattr(cls, name)) for cls in DESIGN_CLASSES for name in counts]

    def counted(name: str, method: Callable) -> Callable:
        def wrapper(self: object, examples: np.ndarray) -> object:
            counts[name] += len(examples)
            return method(self, examples)

        return wrapper

    for cls, name, method in originals:
        setattr(cls, name, counted(name, method))
    try:
        yield counts
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)


def measure(run: Callable[[], Selection], memory_run: Callable[[], Selection] | None = None) -> Run:
    """Wall time and gain evaluations of one untraced call, then tracemalloc's peak over a
    second call (`memory_run`, default `run` again): tracing slows numpy-heavy loops up to
    3x, so it never overlaps the timed call. tracemalloc sees numpy's buffers, not torch's.
    """
    with counting() as counts:
        start = time.perf_counter()
        selection = run()
        seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        (memory_run or run)()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    evaluations = counts["gains"] + counts["screen"]
    return Run(selection, seconds, peak / 2**20, evaluations, counts["gains"])


def compare_lazy_with_plain(
    pool: FeaturePool, k: int, straightforward: bool, title: str = "synthetic"
) -> None:
    n, d = pool.N, pool.d
    threads = default_threads()
    lazy = measure(lambda: select(pool, k, "fisher", threads=threads))
    lazy_1 = measure(lambda: select(pool, k, "fisher", threads=1))
    # plain greedy's memory does not grow with the step: trace a 1/20 budget for its peak
    plain = measure(
        lambda: plain_greedy_fisher(pool, k, threads=threads),
        lambda: plain_greedy_fisher(pool, max(1, k // 20), threads=threads),
    )
    for other in (lazy_1, plain):
        assert np.array_equal(lazy.selection.order, other.selection.order), "picks differ"
        assert np.allclose(lazy.selection.objective, other.selection.objective, rtol=1e-10)
    start = time.perf_counter()
    naive = straightforward_greedy(pool, k, DEFAULT_RIDGE) if straightforward else None
    naive_seconds = time.perf_counter() - start
    same = "not run" if naive is None else str(np.array_equal(naive, lazy.selection.order))
    print(f"\n## fisher (lazy) vs plain greedy, {title} pool: N={n}, d={d}, k={k}\n")
    print("| method | threads | seconds | peak MB | gain evals / pick | f(S_k) | same picks |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = [
        ("fisher (lazy)", threads, lazy),
        ("fisher (lazy)", 1, lazy_1),
        ("plain greedy, batched gains", threads, plain),
    ]
    for name, used, r in rows:
        evals = r.gain_evaluations / k  # the first pass (N exact gains) included, for all
        row = f"{r.seconds:.2f} | {r.peak_mb:.0f} | {evals:.0f} | {r.selection.objective[-1]:.3f}"
        print(f"| {name} | {used} | {row} | yes |")
    if naive is not None:
        print(
            f"| plain greedy, straightforward slogdet loop | 1 | {naive_seconds:.2f} | | {n} | "
            f"| {same} |"
        )
    print(f"\nspeed-up over batched plain greedy: {plain.seconds / lazy.seconds:.1f}x")
    if naive is not None:
        print(
            f"speed-up over the straightforward loop: {naive_seconds / lazy.seconds:.1f}x "
            f"({threads} threads), {naive_seconds / lazy_1.seconds:.1f}x (1 thread)"
        )


def gsm8k_pool(n: int) -> FeaturePool:
    """The statistics the embed step keeps for the first n GSM8K training examples under
    stories260K (both bundled in assets/): real hidden states, d=64, T = answer tokens."""
    from steps.data.ingest import IngestConfig, normalise, write_table
    from steps.data.sources import read_source
    from steps.modeling import IGNORE_INDEX, ModelConfig, encode_examples, load_tokenizer
    from steps.selection.embedding.embed import FILES, EmbedConfig, embed_pool, load_pool

    source = REPO / "assets/data/gsm8k/train.jsonl"
    fields = IngestConfig(source=str(source), prompt_field="question", response_field="answer")
    table = normalise(read_source(str(source), "train", None, REPO), fields, str(source), "train")
    model = ModelConfig(name=str(REPO / "assets/models/stories260K"))
    encoded = encode_examples(
        load_tokenizer(model), list(table.prompt), list(table.response), model
    )
    # as the pipeline's validation does: drop prompts that leave no response token in context
    trainable = [any(t != IGNORE_INDEX for t in e.labels[1:]) for e in encoded]
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "pool.parquet"
        write_table(table[trainable].head(n), path)
        features = embed_pool(
            str(path), model, EmbedConfig(), Path(work) / "features", "cpu", "fp32"
        )
        pool = load_pool(features)  # memory-mapped from the temporary folder: copy it all
        return FeaturePool(**{name: np.array(getattr(pool, name)) for name in FILES})


def scale_lazy(n: int, d: int) -> None:
    print(f"\n## fisher scaling, d={d}, k = N/10\n")
    print("| N | k | seconds | peak MB | gain evals / pick | pool MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    times = []
    for size in (n, 2 * n):
        pool = synthetic_pool(size, d, seed=1)
        r = measure(partial(select, pool, size // 10, "fisher"))
        times.append(r.seconds)
        evals = r.gain_evaluations / (size // 10)
        pool_mb = (pool.factors.nbytes + pool.pooled.nbytes) / 2**20
        row = f"{r.seconds:.2f} | {r.peak_mb:.0f} | {evals:.0f} | {pool_mb:.0f}"
        print(f"| {size} | {size // 10} | {row} |")
    print(f"\ntime ratio 2N / N: {times[1] / times[0]:.2f} (k doubles too)")


def compare_sketches(n: int, d: int, k: int, dims: list[int]) -> None:
    pool = synthetic_pool(n, d, seed=2)
    empty = fisher_objective(pool, [])

    def gain(order: np.ndarray) -> float:
        return fisher_objective(pool, order) - empty

    exact = measure(lambda: select(pool, k, "fisher"))
    best = gain(exact.selection.order)
    print(f"\n## sketches: N={n}, d={d}, k={k}; quality = exact f(S)-f(empty) / exact fisher's\n")
    print("| selection | seconds (project + select) | peak MB | gain evals / pick | quality |")
    print("|---|---:|---:|---:|---:|")

    def row(r: Run, quality: float) -> str:
        evals = r.gain_evaluations / k  # first pass included (0 for the non-fisher selectors)
        return f"{r.seconds:.2f} | {r.peak_mb:.0f} | {evals:.0f} | {quality:.4f}"

    print(f"| fisher, exact d={d} | {row(exact, 1.0)} |")

    def select_sketched(dim: int) -> Selection:
        return select(project(pool, dim, seed=0), k, "fisher")

    for dim in dims:
        sketched = measure(partial(select_sketched, dim))
        quality = gain(sketched.selection.order) / best
        print(f"| fisher, projected to {dim} | {row(sketched, quality)} |")
    for name in ("uniform", "fisher-pooled", "longest"):
        other = measure(partial(select, pool, k, name))
        print(f"| {name} | {row(other, gain(other.selection.order) / best)} |")


def compare_backends(pool: FeaturePool, k: int, device: str, title: str) -> None:
    """`fisher` on the numpy design and on the torch design (`device`), same process and
    pool: the picks must be equal; torch / numpy is the time ratio."""
    print(f"\n## backends, {title}: N={pool.N}, d={pool.d}, k={k}\n")
    print(
        "| backend | device | seconds | peak MB (numpy buffers) | evals / pick | float64 / pick |"
    )
    print("|---|---|---:|---:|---:|---:|")
    runs = {}
    for backend, on in (("numpy", "cpu"), ("torch", device)):
        runs[backend] = r = measure(partial(select, pool, k, "fisher", backend=backend, device=on))
        evals, checks = r.gain_evaluations / k, r.float64_gains / k
        row = f"{r.seconds:.2f} | {r.peak_mb:.0f} | {evals:.0f} | {checks:.1f}"
        print(f"| {backend} | {on} | {row} |")
    numpy_run, torch_run = runs["numpy"], runs["torch"]
    assert np.array_equal(numpy_run.selection.order, torch_run.selection.order), "picks differ"
    ratio = torch_run.seconds / numpy_run.seconds
    print(f"\nsame picks; torch / numpy time: {ratio:.2f}")


def exact_wide(args: argparse.Namespace) -> None:
    """Exact (unsketched) d=768 selection of args.exact examples; run in a child process so
    that its max RSS is this case's peak alone."""
    n, k = args.exact, args.k_exact or args.exact // 10
    path = None if args.pool_dir is None else Path(args.pool_dir) / f"factors-{n}.npy"
    start = time.perf_counter()
    pool = synthetic_pool(n, 768, seed=4, path=path)
    made = time.perf_counter() - start
    settings = GreedySettings(device_memory_mb=args.device_memory_mb)
    with counting() as counts:
        start = time.perf_counter()
        chosen = select(
            pool, k, "fisher", progress=True, settings=settings, backend=args.backend,
            device=args.device,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    pool_mb = (pool.factors.nbytes + pool.pooled.nbytes) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0
    print(f"\n## exact fisher: N={n}, d=768, k={k}, {args.backend} on {args.device}\n")
    print(f"(pool drawn in {made:.0f} s{'' if path is None else f', memory-mapped at {path}'})\n")
    print("| seconds (select) | re-evals / pick | float64 / pick | peak RSS MB | CUDA peak MB |")
    print("|---:|---:|---:|---:|---:|")
    evals = (counts["gains"] + counts["screen"] - n) / k  # after the first pass over N
    row = f"{seconds:.1f} | {evals:.1f} | {counts['gains'] / k:.2f} | {peak_mb:.0f} | {cuda:.0f}"
    print(f"| {row} |")
    print(f"\nstatistics {pool_mb:.0f} MB; f(S_k) = {chosen.objective[-1]:.3f}")
    if args.versus_unscreened:
        # The same call with the float32 screen off (screen_min_d above d): the code path
        # before screening, side by side, same picks asserted.
        start = time.perf_counter()
        plain = select(
            pool, k, "fisher", settings=replace(settings, screen_min_d=10**9),
            backend=args.backend, device=args.device,
        )  # fmt: skip
        unscreened = time.perf_counter() - start
        assert np.array_equal(plain.order, chosen.order), "screening changed the picks"
        print(
            f"unscreened (screen_min_d > d): {unscreened:.1f} s, identical picks; "
            f"screened {unscreened / seconds:.2f}x faster"
        )


def large_pool(n: int, k: int, d: int, dim: int, rank: int, args: argparse.Namespace) -> None:
    """Selection from precomputed sketched statistics; run in a child process so that its
    max RSS is this case's peak alone."""
    pool = sketched_pool(n, d, dim, rank, seed=3)
    backend, device = args.backend, args.device
    settings = GreedySettings(device_memory_mb=args.device_memory_mb)
    start = time.perf_counter()
    chosen = select(
        pool, k, "fisher", progress=True, settings=settings, backend=backend, device=device
    )
    seconds = time.perf_counter() - start
    pool_mb = (pool.factors.nbytes + pool.pooled.nbytes) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n## fisher at scale: N={n}, d={d} sketched to {dim}, rank <= {rank}, k={k}")
    print(f"({backend} on {device})\n")
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0
    print("| seconds (select) | process peak RSS MB | CUDA peak MB | statistics MB | f(S_k) |")
    print("|---:|---:|---:|---:|---:|")
    row = f"{seconds:.1f} | {peak_mb:.0f} | {cuda:.0f} | {pool_mb:.0f}"
    print(f"| {row} | {chosen.objective[-1]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="pool size for lazy vs plain")
    parser.add_argument("--d", type=int, default=64, help="hidden size for lazy vs plain")
    parser.add_argument("--k", type=int, default=500, help="budget for lazy vs plain")
    parser.add_argument("--n-768", type=int, default=1000, help="pool size of the d=768 run")
    parser.add_argument(
        "--gsm8k", type=int, default=5000, help="real pool: first N bundled GSM8K rows (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--n-large", type=int, default=100_000, help="pool of the at-scale run")
    parser.add_argument("--k-large", type=int, default=0, help="its budget (0: N/10)")
    parser.add_argument("--large-only", action="store_true", help="only the at-scale run")
    parser.add_argument(
        "--straightforward", action="store_true", help="also time the slogdet-loop reference"
    )
    parser.add_argument(
        "--backend", choices=["numpy", "torch"], default="numpy", help="of --exact, at scale"
    )
    parser.add_argument("--device", default="cpu", help="of the torch backend (cpu, cuda)")
    parser.add_argument("--device-memory-mb", type=int, default=4096, help="torch's budget")
    parser.add_argument(
        "--backends-only", action="store_true", help="only numpy vs torch, side by side"
    )
    parser.add_argument("--exact", type=int, default=0, help="only: exact d=768 of N examples")
    parser.add_argument("--k-exact", type=int, default=0, help="its budget (0: N/10)")
    parser.add_argument("--pool-dir", default=None, help="memory-map --exact's factors here")
    parser.add_argument(
        "--versus-unscreened", action="store_true", help="--exact also without float32 screening"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.n_768, args.gsm8k = 1000, 100, 300, 300
    if args.large_only:
        k = args.k_large or args.n_large // 10
        large_pool(args.n_large, k, 768, 64, 16, args)
        return
    if args.exact:
        exact_wide(args)
        return
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(f"# bench_select ({os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={threads})")
    compare_backends(synthetic_pool(args.n, args.d, seed=0), args.k, args.device, "synthetic")
    wide = synthetic_pool(args.n_768, 768, seed=2)
    compare_backends(wide, args.n_768 // 10, args.device, "synthetic, exact")
    if args.backends_only:
        return
    compare_lazy_with_plain(synthetic_pool(args.n, args.d, seed=0), args.k, args.straightforward)
    if args.gsm8k:
        pool = gsm8k_pool(args.gsm8k)
        t = pool.n_tokens
        title = f"GSM8K / stories260K (T = {t.min()}-{t.max()}, median {np.median(t):.0f})"
        compare_lazy_with_plain(pool, args.gsm8k // 10, args.straightforward, title)
    scale_lazy(args.n, args.d)
    compare_sketches(args.n_768, 768, args.n_768 // 10, [64, 128, 256])
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess max RSS: {max_rss_mb:.0f} MB")
    large = 10_000 if args.quick else args.n_large
    command = [sys.executable, __file__, "--large-only", "--n-large", str(large)]
    command += ["--backend", args.backend, "--device", args.device]
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
