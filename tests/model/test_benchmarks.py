"""Benchmarks on stories260K (CPU): Sift's local tasks ask exactly what lm-eval's built-ins ask,
its scores are lm-eval's own, and nothing leaks between models or into the caller's objects.

Limits are small (3-10 documents a task): these pin behaviour, not the model's skill.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps.evaluation.benchmarks import BenchmarkReport, run_benchmarks
from steps.evaluation.evaluate import EvalConfig
from steps.evaluation.suites import (
    BenchmarkPlan,
    builtin_task_path,
    load_tasks,
    plan_benchmarks,
    quiet_harness,
    task_configs,
)
from tests.conftest import MODEL_DIR, shifted_model_copy

pytestmark = pytest.mark.slow

STANDARD = ("arc_easy", "arc_challenge", "piqa", "boolq", "lambada_openai", "winogrande",
            "openbookqa", "gsm8k")  # fmt: skip
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed


def _plan(tmp_path: Path, **fields) -> BenchmarkPlan:
    return plan_benchmarks(EvalConfig(**fields), tmp_path)


def _only(plan: BenchmarkPlan, *names: str) -> BenchmarkPlan:
    """The plan's tasks named (fingerprint kept: these tests compare runs, not plans)."""
    return dataclasses.replace(plan, tasks=tuple(t for t in plan.tasks if t.name in names))


def _load(path: str) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _samples(report: BenchmarkReport) -> list[dict]:
    return [json.loads(line) for line in Path(report.samples_path).read_text().splitlines()]


@pytest.fixture(scope="module")
def standard_plan(tmp_path_factory) -> BenchmarkPlan:
    return _plan(tmp_path_factory.mktemp("project"), suite="standard")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick suite, 10 documents a task, on a model left in training mode by its caller."""
    tmp_path = tmp_path_factory.mktemp("quick")
    plan = _plan(tmp_path, suite="quick", limit=10)
    model, tokenizer = _load(str(MODEL_DIR))
    pad_before = tokenizer.pad_token
    model.train()
    with pytest.MonkeyPatch.context() as patch:
        # lm-eval's bootstrapped stderrs (lambada's perplexity) must not fork a Pool from a
        # process with other threads: a forked worker hung a whole CI run.
        patch.setattr(multiprocessing, "Pool", _no_pool)
        report = run_benchmarks(model, tokenizer, plan, tmp_path / "bench", "cpu", batch_size=16)
    return plan, report, model, tokenizer, pad_before


def _no_pool(*args, **kwargs):
    raise AssertionError("multiprocessing.Pool started during a benchmark run")


def _builtin_task(spec) -> object:
    """lm-eval's built-in task, config unchanged, its hub dataset replaced by the bundled rows
    under the built-in's own split names (empty splits where the slice has none: zero-shot
    tasks never read them, but the harness builds a sampler over the training split)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(builtin_task_path(spec.name), resolve_func=True)
    files = json.loads(spec.overrides)["dataset_kwargs"]["data_files"]
    splits = {
        split: datasets.Dataset.from_list(
            [json.loads(line) for line in Path(path).read_text().splitlines()]
        )
        for split, path in files.items()
    }
    any_split = next(iter(splits.values()))
    for key in SPLIT_KEYS:
        if config.get(key) and config[key] not in splits:
            splits[config[key]] = any_split.select([])
    bundled = datasets.DatasetDict(splits)
    assert set(files) <= {config.get(key) for key in SPLIT_KEYS}, "slice split not built-in"

    def custom_dataset(**kwargs) -> datasets.DatasetDict:  # called with metadata, ds kwargs
        return bundled

    with quiet_harness():
        return ConfigurableTask(config={**config, "custom_dataset": custom_dataset})


def _request_arguments(task, limit: int) -> list[tuple]:
    task.set_fewshot_seed(FEWSHOT_SEED)
    with quiet_harness():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [instance.arguments for instance in task.instances]


@pytest.mark.parametrize("name", STANDARD)
def test_local_task_requests_equal_builtin_task_requests(standard_plan: BenchmarkPlan, name):
    spec = next(t for t in standard_plan.tasks if t.name == name)
    local = load_tasks(_only(standard_plan, name))[name]
    builtin = _builtin_task(spec)
    assert local.config.num_fewshot == builtin.config.num_fewshot
    limit = 8
    expected = _request_arguments(builtin, limit)
    actual = _request_arguments(local, limit)
    assert len(expected) >= limit
    assert json.dumps(actual) == json.dumps(expected)  # byte-identical, request by request
    assert actual == expected
    if name == "gsm8k":  # the 5-shot context came from the bundled train split
        assert builtin.config.num_fewshot == 5
        context = actual[0][0]
        assert context.count("Question:") == 6


def test_quick_run_scores_and_logs(quick_run):
    plan, report, *_ = quick_run
    assert report.plan_fingerprint == plan.fingerprint
    assert {s.task for s in report.scores} == set(plan.names)
    assert report.documents == 10 * len(plan.names)
    for score in report.scores:
        assert score.documents == 10, score.key
        assert score.stderr is not None, score.key
        if score.metric in {"acc", "acc_norm"}:
            assert 0.0 <= score.value <= 1.0, score.key
            assert score.higher_is_better
    assert report.score("lambada_openai/perplexity").higher_is_better is False
    results = json.loads(Path(report.results_path).read_text())
    assert set(plan.names) <= set(results["results"])
    samples = _samples(report)
    for name in plan.names:
        assert sorted(r["doc_id"] for r in samples if r["task"] == name) == list(range(10))


def test_run_leaves_tokenizer_and_training_mode(quick_run):
    _, _, model, tokenizer, pad_before = quick_run
    assert tokenizer.pad_token == pad_before  # HFLM set its pad token on a copy
    assert model.training


def test_second_model_is_scored_not_served_from_a_cache(tmp_path: Path):
    """A request cache keyed on the request alone would return the first model's answers."""
    plan = _only(_plan(tmp_path, suite="quick", limit=10), "arc_easy")
    shifted_dir = shifted_model_copy(tmp_path / "shifted", 0.05)
    loglikelihoods = []
    for name, path in (("bundled", str(MODEL_DIR)), ("shifted", shifted_dir)):
        model, tokenizer = _load(path)
        report = run_benchmarks(model, tokenizer, plan, tmp_path / name, "cpu", batch_size=16)
        rows = sorted(_samples(report), key=lambda r: r["doc_id"])
        loglikelihoods.append([resp[0][0] for r in rows for resp in r["resps"]])
    bundled, shifted = loglikelihoods
    assert len(bundled) == len(shifted) > 10
    differing = sum(abs(a - b) > 1e-3 for a, b in zip(bundled, shifted, strict=True))
    assert differing > len(bundled) // 2


def test_scores_equal_lm_eval_run_directly(quick_run):
    import lm_eval
    from lm_eval.tasks import TaskManager

    plan, report, *_ = quick_run
    with quiet_harness():
        direct = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(MODEL_DIR), "dtype": "float32"},
            tasks=task_configs(plan),
            limit=plan.limit,
            batch_size=16,
            device="cpu",
            task_manager=TaskManager(include_defaults=False),
            verbosity="ERROR",
        )
    compared = 0
    for name in plan.names:
        for metric in ("acc", "acc_norm"):
            score = report.score(f"{name}/{metric}")
            if score is None:
                assert f"{metric},none" not in direct["results"][name]
                continue
            assert score.value == direct["results"][name][f"{metric},none"], score.key
            assert score.stderr == direct["results"][name][f"{metric}_stderr,none"], score.key
            compared += 1
    assert compared == 9  # acc of all six, acc_norm of arc_easy, arc_challenge and piqa


def test_truncated_counts_documents_cut_to_the_context(standard_plan: BenchmarkPlan, tmp_path):
    """gsm8k's 5-shot prompts overflow stories260K's 512 tokens; arc_easy's do not. gsm8k is
    logged once per filter: each document still counts once."""
    plan = dataclasses.replace(_only(standard_plan, "arc_easy", "gsm8k"), limit=3)
    model, tokenizer = _load(str(MODEL_DIR))
    report = run_benchmarks(model, tokenizer, plan, tmp_path / "bench", "cpu", batch_size=16)
    assert report.max_length == 512
    gsm8k = [s for s in report.scores if s.task == "gsm8k"]
    assert {s.filter for s in gsm8k} == {"strict-match", "flexible-extract"}
    assert all(s.truncated == 3 and s.documents == 3 for s in gsm8k)
    assert all(s.truncated == 0 for s in report.scores if s.task == "arc_easy")
    assert report.documents == 6


def test_benchmarks_run_under_the_runs_precision(tmp_path: Path):
    """precision=bf16 scores through autocast (what model.precision=auto picks for a real
    model on a CPU with native bf16): the log-likelihoods are bf16's, near fp32's, and the
    model keeps its fp32 weights."""
    plan = _only(_plan(tmp_path, suite="quick", limit=10), "arc_easy")
    model, tokenizer = _load(str(MODEL_DIR))
    loglikelihoods = {}
    for precision in ("fp32", "bf16"):
        report = run_benchmarks(model, tokenizer, plan, tmp_path / precision, "cpu",
                                batch_size=16, precision=precision)  # fmt: skip
        rows = sorted(_samples(report), key=lambda r: r["doc_id"])
        loglikelihoods[precision] = [resp[0][0] for r in rows for resp in r["resps"]]
    fp32, bf16 = loglikelihoods["fp32"], loglikelihoods["bf16"]
    assert len(fp32) == len(bf16) > 10 and fp32 != bf16
    assert max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(fp32, bf16, strict=True)) < 0.05
    assert next(model.parameters()).dtype == torch.float32
