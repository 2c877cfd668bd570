"""Sift's benchmark evaluation against lm-eval run directly ; prints markdown tables.

    python benchmarks/bench_evaluate.py                       # arc_easy + piqa, 200 docs each
    python benchmarks/bench_evaluate.py --tasks arc_easy --limit 50 --repeats 1
    python benchmarks/bench_evaluate.py --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --tasks quick --limit 20                            # the quick suite's six tasks

Both score the same model (--model: the bundled stories260K unless given; what model.name takes,
a .gguf file converted once into .sift/gguf/ by benchmarks/model_arguments.py, the folder both
sides then load) on the same local files (the FULL llm-foundry copies, converted into a
temporary folder by steps.evaluation.convert), the same task, limit and batch size, on the CPU
with one torch thread, in --precision (fp32; or bf16: Sift asks lm-eval's HFLM for its own
mixed precision, bf16 autocast with an fp32 log-softmax, and the direct side asks the same):
(a) Sift: plan_benchmarks on a one-task suite (the member of suites/quick.yaml) and
    run_benchmarks on the model loaded by steps.modeling;
(b) direct: lm_eval.simple_evaluate(model="hf", ...) on a plain task YAML that includes the
    built-in one and swaps only the dataset, as a user of lm-eval would write it.
Timed end to end, model loading included in both (Sift: load_model + load_tokenizer + plan +
run; direct: simple_evaluate, which loads the model itself); each side runs `--repeats` times,
alternating which goes first, best time kept (wall clock, and the process's CPU time, which
neighbours on a shared box disturb less). The goal: Sift/direct >= 0.9.
Scores must be identical (exact float equality of every metric and its stderr) and every
document's logged requests (`arguments`) byte-identical; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from model_arguments import benchmark_model

from steps.evaluation.benchmarks import BenchmarkReport, run_benchmarks
from steps.evaluation.convert import convert_task
from steps.evaluation.evaluate import EvalConfig
from steps.evaluation.suites import SUITES_DIR, builtin_task_path, plan_benchmarks, quiet_harness
from steps.modeling import ModelConfig, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "assets/models/stories260K"


@dataclass
class Timed:
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time: steadier than wall on a shared box
    scores: dict[str, tuple[float, float | None]]  # "metric,filter" → (value, stderr)
    arguments: dict[tuple[int, str], str]  # (doc_id, filter) → the requests as JSON


def suite_member(task: str) -> dict[str, Any]:
    """The task's entry in the quick/standard suite: Sift's dataset override for it."""
    for suite in ("quick", "standard"):
        members = yaml.safe_load((SUITES_DIR / f"{suite}.yaml").read_text())["task"]
        found = next((m for m in members if m["task"] == task), None)
        if found is not None:
            return found
    raise SystemExit(f"--tasks: {task!r} is in neither the quick nor the standard suite")


def suite_tasks(names: str) -> list[str]:
    """--tasks: a suite's name stands for its tasks, in the suite's order."""
    suite = SUITES_DIR / f"{names}.yaml"
    if suite.is_file():
        return [member["task"] for member in yaml.safe_load(suite.read_text())["task"]]
    return names.split(",")


def write_task_files(task: str, data_dir: Path, work_dir: Path) -> tuple[Path, Path]:
    """A one-task Sift suite (data_files relative to data_dir) and a plain lm-eval YAML
    (`include:` the built-in YAML + the same dataset override, absolute data files)."""
    member = suite_member(task)
    suite_path = work_dir / f"suite_{task}.yaml"
    suite_path.write_text(yaml.safe_dump({"group": f"bench_{task}", "task": [member]}))
    builtin = builtin_task_path(task)
    if builtin is None:
        raise SystemExit(f"lm-eval {version('lm_eval')} has no built-in task {task!r}")
    files = member["dataset_kwargs"]["data_files"]
    direct = {"include": str(builtin), **member}
    direct["dataset_kwargs"] = {"data_files": {s: str(data_dir / f) for s, f in files.items()}}
    include_dir = work_dir / f"direct_{task}"
    include_dir.mkdir()
    (include_dir / f"{task}.yaml").write_text(yaml.safe_dump(direct))
    return suite_path, include_dir


def _arguments(rows: list[dict[str, Any]]) -> dict[tuple[int, str], str]:
    from lm_eval.utils import handle_non_serializable

    return {
        (row["doc_id"], row.get("filter", "none")): json.dumps(
            row["arguments"], default=handle_non_serializable
        )
        for row in rows
    }


def run_sift(
    task: str, suite_path: Path, data_dir: Path, args: argparse.Namespace, out: Path
) -> tuple[Timed, BenchmarkReport]:
    started, cpu = time.perf_counter(), time.process_time()
    config = EvalConfig(suite=str(suite_path), data_dir=str(data_dir), limit=args.limit)
    plan = plan_benchmarks(config, REPO)
    model_config = ModelConfig(name=args.model_dir)
    model, tokenizer = load_model(model_config, "cpu"), load_tokenizer(model_config)
    report = run_benchmarks(model, tokenizer, plan, out, "cpu", args.batch_size,
                            precision=args.precision)  # fmt: skip
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    with Path(report.samples_path).open() as handle:
        rows = [json.loads(line) for line in handle]
    scores = {f"{s.metric},{s.filter}": (s.value, s.stderr) for s in report.scores}
    return Timed(seconds, cpu, scores, _arguments(rows)), report


def run_direct(task: str, include_dir: Path, args: argparse.Namespace) -> Timed:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    started, cpu = time.perf_counter(), time.process_time()
    with quiet_harness():  # as Sift's run: lm-eval's INFO lines off the console
        results = simple_evaluate(
            model="hf",
            model_args={"pretrained": args.model_dir, "dtype": "float32", **_mixed(args)},
            tasks=[task],
            limit=args.limit,
            batch_size=args.batch_size,
            device="cpu",
            task_manager=TaskManager(include_path=str(include_dir), include_defaults=False),
            verbosity="ERROR",
        )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    metrics = results["results"][task]
    scores = {}
    for key, value in metrics.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and not metric.endswith("_stderr"):
            scores[key] = (float(value), metrics.get(f"{metric}_stderr,{filter_name}"))
    return Timed(seconds, cpu, scores, _arguments(results["samples"][task]))


def _mixed(args: argparse.Namespace) -> dict[str, str]:
    """lm-eval's own mixed precision, as Sift's run_benchmarks asks it for bf16."""
    if args.precision == "fp32":
        return {}
    return {"mixed_precision_dtype": "bfloat16", "softmax_dtype": "float32"}


def compare_task(
    task: str, data_dir: Path, work_dir: Path, args: argparse.Namespace
) -> tuple[Timed, Timed, BenchmarkReport]:
    suite_path, include_dir = write_task_files(task, data_dir, work_dir)
    sift: Timed | None = None
    direct: Timed | None = None
    report: BenchmarkReport | None = None
    sift_cpu, direct_cpu = float("inf"), float("inf")
    for repeat in range(args.repeats):
        for side in ("sift", "direct") if repeat % 2 == 0 else ("direct", "sift"):
            if side == "sift":
                run, ran = run_sift(task, suite_path, data_dir, args, work_dir / f"sift_{task}")
                sift_cpu = min(sift_cpu, run.cpu_seconds)
                if sift is None or run.seconds < sift.seconds:
                    sift, report = run, ran  # the best run's report, for its own seconds
            else:
                run = run_direct(task, include_dir, args)
                direct_cpu = min(direct_cpu, run.cpu_seconds)
                direct = run if direct is None or run.seconds < direct.seconds else direct
    assert sift is not None and direct is not None and report is not None
    sift.cpu_seconds, direct.cpu_seconds = sift_cpu, direct_cpu  # best of each, like wall
    return sift, direct, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--model", default=str(MODEL_DIR), help="model.name: folder, hub id, .gguf")
    parser.add_argument(
        "--tasks",
        default="arc_easy,piqa",
        help="comma-separated lm-eval tasks, or a suite's name (quick, standard): all its tasks",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--llmfoundry-dir",
        type=Path,
        default=Path("../shared/data/llmfoundry_eval"),
        help="llm-foundry's scripts/eval/local_data files (converted into a temporary folder)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per side; best is kept")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="both sides: fp32, or bf16 autocast (fp32 weights) with an fp32 log-softmax",
    )
    args = parser.parse_args()
    if not args.llmfoundry_dir.is_dir():
        raise SystemExit(
            f"--llmfoundry-dir {args.llmfoundry_dir.resolve()}: no such folder (the benchmark "
            "converts the full eval files from llm-foundry's scripts/eval/local_data)"
        )
    torch.set_num_threads(1)
    tasks = suite_tasks(args.tasks)
    args.model_dir = benchmark_model(args.model).name  # a GGUF: its converted folder, once
    print(f"# bench_evaluate ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"lm-eval {version('lm_eval')}, {args.model}, limit {args.limit}, batch "
          f"{args.batch_size}, best of {args.repeats})")  # fmt: skip
    speed = ["| task | docs | Sift s | direct s | Sift docs/s | direct docs/s | ratio | "
             "CPU s Sift / direct | ratio by CPU time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    scores = ["| task | metric | Sift | direct | identical |", "|---|---|---:|---:|---|"]
    differ, mismatched, compared = False, 0, 0
    notes = []
    with tempfile.TemporaryDirectory() as work:
        work_dir, data_dir = Path(work), Path(work) / "eval"
        for task in tasks:
            gsm8k_dir = args.llmfoundry_dir.parent / "gsm8k"  # read for gsm8k only
            convert_task(task, args.llmfoundry_dir, gsm8k_dir, data_dir)
            sift, direct, report = compare_task(task, data_dir, work_dir, args)
            docs = report.documents
            ratio = direct.seconds / sift.seconds  # (docs/s Sift) / (docs/s direct)
            speed.append(f"| {task} | {docs} | {sift.seconds:.2f} | {direct.seconds:.2f} | "
                         f"{docs / sift.seconds:.1f} | {docs / direct.seconds:.1f} | "
                         f"{ratio:.2f} | {sift.cpu_seconds:.2f} / {direct.cpu_seconds:.2f} | "
                         f"{direct.cpu_seconds / sift.cpu_seconds:.2f} |")  # fmt: skip
            truncated = max(s.truncated for s in report.scores)
            notes.append(f"{task}: in Sift's best run, run_benchmarks alone took "
                         f"{report.seconds:.2f} s ({docs / report.seconds:.1f} docs/s); "
                         f"{truncated} documents left-truncated to {report.max_length} "
                         "tokens")  # fmt: skip
            for key in sorted(set(sift.scores) | set(direct.scores)):
                mine, theirs = sift.scores.get(key), direct.scores.get(key)
                same = mine == theirs
                differ |= not same
                show = [f"{s[0]:.6f} ± {s[1]:.6f}" if s and s[1] is not None else str(s)
                        for s in (mine, theirs)]  # fmt: skip
                scores.append(f"| {task} | {key} | {show[0]} | {show[1]} | "
                              f"{'yes' if same else 'NO'} |")  # fmt: skip
            keys = set(sift.arguments) | set(direct.arguments)
            compared += len(keys)
            mismatched += sum(sift.arguments.get(k) != direct.arguments.get(k) for k in keys)
    print("\n## speed (model loading included on both sides)\n", *speed, sep="\n")
    print("\n## scores\n", *scores, sep="\n")
    print("", *notes, sep="\n")
    print(f"requests: {compared} logged documents compared, {mismatched} with arguments "
          "that differ")  # fmt: skip
    if differ or mismatched:
        print("FAIL: Sift and lm-eval disagree", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
