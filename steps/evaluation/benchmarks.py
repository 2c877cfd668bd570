"""Benchmarks through lm-evaluation-harness's Python API, on an already-loaded model.

Scores are lm-eval's own (its task configs, metrics, filters, stderr); Sift adds what the
harness leaves to its user: no request cache (it is keyed on the request alone, so a cache
shared across checkpoints returns the first model's scores), a copy of the tokenizer (HFLM
sets its pad token) and the model's train/eval mode restored, one BLAS thread on a small
CPU box, and a count of the requests the harness left-truncated to fit the model's context.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steps.evaluation.suites import BenchmarkPlan, quiet_harness, task_manager, tasks_to_run
from steps.hardware import AUTOCAST_DTYPES
from steps.modeling import PromptShape


@dataclass(frozen=True)
class BenchmarkScore:
    task: str
    metric: str  # lm-eval's name: acc, acc_norm, perplexity, exact_match, ...
    filter: str  # "none", or e.g. strict-match / flexible-extract
    value: float
    stderr: float | None
    higher_is_better: bool
    version: str  # the task's version (lm-eval's metadata.version)
    documents: int
    truncated: int  # requests left-truncated to the model's context

    @property
    def key(self) -> str:
        """task/metric (task/metric/filter where a filter applies): the gate's metric name."""
        base = f"{self.task}/{self.metric}"
        return base if self.filter == "none" else f"{base}/{self.filter}"


@dataclass(frozen=True)
class BenchmarkReport:
    plan_fingerprint: str
    scores: tuple[BenchmarkScore, ...]
    results_path: str  # lm-eval's results JSON (configs, versions, n-shot, ...)
    samples_path: str  # its per-sample log, one JSON line per document
    max_length: int  # the context the harness used
    documents: int
    seconds: float

    def score(self, key: str) -> BenchmarkScore | None:
        return next((s for s in self.scores if s.key == key), None)


@dataclass(frozen=True)
class ModelBenchmarks:
    """One model's evaluation, as the report shows it beside the others."""

    role: str  # base | challenger | champion
    label: str  # e.g. "stories260K (base)", "sift-gsm8k v3"
    eval_loss: float | None  # held-out loss on the eval split (nats per response token)
    report: BenchmarkReport | None  # None: no benchmarks (eval.suite=none)
    generations: tuple[tuple[str, str], ...] = ()  # (eval prompt, the model's answer)


@contextlib.contextmanager
def _cpu_threads(device: str) -> Iterator[None]:
    """One thread on a small CPU box: for a tiny model two busy threads were 10-35x slower."""
    before = torch.get_num_threads()
    small = device == "cpu" and (os.cpu_count() or 1) <= 4
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _serial_bootstrap() -> Iterator[None]:
    """lm-eval bootstraps some stderrs (perplexity, f1, bleu, ...) in a multiprocessing.Pool,
    forked from this process, whose other threads (Prefect's, tqdm's, torch's) can hold
    locks at the fork: a forked worker then waits forever, and so did the run (seen in CI:
    the pipeline stuck in Pool.terminate). DISABLE_MULTIPROC makes it draw the same
    resamples in this process."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    plan: BenchmarkPlan,
    out_dir: Path,
    device: str,
    batch_size: int,
    bootstrap_iters: int = 100000,
    precision: str = "fp32",
) -> BenchmarkReport:
    """Scores `model` on the plan's tasks; writes results.json and samples.jsonl in out_dir.
    The forwards run in the run's precision, as embed and the held-out loss do."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks_to_run(plan)
    was_training = model.training
    started = time.perf_counter()
    try:
        with _cpu_threads(device), _serial_bootstrap(), quiet_harness():
            lm = HFLM(pretrained=model, tokenizer=_harness_tokenizer(tokenizer),
                      batch_size=batch_size, device=device,
                      **_mixed_precision(precision))  # fmt: skip
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks.values()),
                num_fewshot=plan.num_fewshot,
                limit=plan.limit,
                use_cache=None,
                cache_requests=False,
                log_samples=True,
                bootstrap_iters=bootstrap_iters,
                verbosity="ERROR",
                task_manager=task_manager(plan),
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    samples = results.pop("samples")
    truncated = {name: _truncated(lm, rows) for name, rows in samples.items()}
    results_path, samples_path = _write(results, samples, out_dir)
    scores = tuple(_scores(results, truncated))
    # lm-eval logs a document once per filter (gsm8k: twice): count documents, not rows
    documents = sum(len({row["doc_id"] for row in rows}) for rows in samples.values())
    return BenchmarkReport(plan.fingerprint, scores, str(results_path), str(samples_path),
                           lm.max_length, documents, seconds)  # fmt: skip


def _mixed_precision(precision: str) -> dict[str, torch.dtype]:
    """HFLM's own autocast (fp32 weights, matmuls in bf16/fp16), which it applies around each
    forward, with log-softmax taken in fp32: log-likelihoods summed from bf16 log-probs
    would keep about three digits."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return {"mixed_precision_dtype": dtype, "softmax_dtype": torch.float32} if dtype else {}


def _scores(results: dict[str, Any], truncated: dict[str, int]) -> Iterator[BenchmarkScore]:
    for task, metrics in results["results"].items():
        if task not in results.get("versions", {}) or task not in truncated:
            continue  # a group's aggregate row
        better = results.get("higher_is_better", {}).get(task, {})
        documents = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or metric == "alias":
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            yield BenchmarkScore(
                task=task,
                metric=metric,
                filter=filter_name,
                value=float(value),
                stderr=float(stderr) if isinstance(stderr, int | float) else None,
                higher_is_better=bool(better.get(metric, True)),
                version=str(results["versions"][task]),
                documents=documents,
                truncated=truncated[task],
            )


def _truncated(lm: Any, rows: list[dict[str, Any]]) -> int:
    """Documents with a request the harness cut from the left to fit lm.max_length (it does
    so silently): loglikelihood keeps the last max_length + 1 tokens of context +
    continuation, generation the last max_length - max_gen_toks tokens of the context.
    A document logged once per filter (gsm8k) counts once."""
    cut_documents: set[Any] = set()
    for row in rows:
        if row["doc_id"] in cut_documents:
            continue
        for request in _requests(row):
            args = request
            context = args[0] if args else ""
            if len(args) > 1 and isinstance(args[1], str):
                whole, continuation = lm._encode_pair(context, args[1])
                cut = len(whole) + len(continuation) > lm.max_length + 1
            else:
                cut = len(lm.tok_encode(context)) > lm.max_length - lm.max_gen_toks
            if cut:
                cut_documents.add(row["doc_id"])
                break
    return len(cut_documents)


def _requests(row: dict[str, Any]) -> list[list[Any]]:
    """A logged sample's requests as argument lists ((context, continuation) or (context,
    generation kwargs)); lm-eval logs them as a list, or as {"gen_args_0": {"arg_0": ...}}."""
    arguments = row.get("arguments") or []
    requests = arguments.values() if isinstance(arguments, dict) else arguments
    return [list(r.values()) if isinstance(r, dict) else list(r) for r in requests]


def _write(
    results: dict[str, Any], samples: dict[str, list[dict[str, Any]]], out_dir: Path
) -> tuple[Path, Path]:
    from lm_eval.utils import handle_non_serializable

    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    samples_path = out_dir / "samples.jsonl"
    with samples_path.open("w") as handle:
        for task, rows in samples.items():
            for row in rows:
                line = {"task": task, **row}
                handle.write(json.dumps(line, default=handle_non_serializable) + "\n")
    return results_path, samples_path


def _harness_tokenizer(tokenizer: Any) -> Any:
    """A copy for HFLM (it sets its pad token). lm-eval tokenizes a context whole and keeps
    its last max_length tokens itself (the report counts them: `truncated`), so transformers'
    once-per-tokenizer notice that a sequence past the model's context "will result in
    indexing errors" is false there: the copy starts as transformers leaves a tokenizer
    after giving it."""
    harness = copy.deepcopy(tokenizer)
    harness.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return harness


def sample_generations(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    shape: PromptShape,
    max_new_tokens: int,
    device: str,
) -> list[str]:
    """Greedy answers to a few eval prompts, shown as the model saw prompts in training."""
    answers = []
    was_training = model.training
    model.eval()
    stop = {"eos_token_id": list(shape.stop_ids)} if shape.stop_ids else {}
    try:
        with torch.inference_mode(), _cpu_threads(device):
            for prompt in prompts:
                text = shape.text(prompt)
                encoded = tokenizer(
                    text, return_tensors="pt", add_special_tokens=shape.add_special_tokens
                ).to(device)
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    **stop,
                )
                new_tokens = output[0, encoded["input_ids"].shape[1] :]
                answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
