"""One model's whole evaluation: held-out loss, benchmarks and sample generations.

The pipeline's evaluate step and `sift evaluate` both call `score_model`, for a base model,
a fine-tuned folder or a registry version, so their numbers are the same code's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from steps.encoding import ChatEncoding, generation_prompts
from steps.evaluation.benchmarks import ModelBenchmarks, run_benchmarks, sample_generations
from steps.evaluation.evaluate import EvalConfig, EvalReport, evaluation_loss
from steps.evaluation.results import Measured, Scored
from steps.evaluation.suites import BenchmarkPlan
from steps.hashing import file_md5
from steps.modeling import ModelConfig, ModelSource, load_model, load_tokenizer


@dataclass(frozen=True)
class Scoring:
    evaluation: EvalReport | None  # None: no eval split given (sift evaluate --eval-data)
    benchmarks: ModelBenchmarks
    # md5 of the model.safetensors these numbers were measured on, for a model folder; ""
    # for a hub id or a registry version. A cached Scoring is only ever the one of those bytes
    # (flows/caching.py TrainedWeights keys the task on them).
    weights_md5: str = ""


def score_model(
    model: Any,
    tokenizer: Any,
    *,
    role: str,
    label: str,
    eval_path: str | None,
    model_config: ModelConfig,
    config: EvalConfig,
    plan: BenchmarkPlan,
    out_dir: Path,
    device: str,
    precision: str,
    chat: ChatEncoding | None = None,
) -> Scoring:
    """`chat`: how an eval split of conversations is encoded (steps/encoding.py)."""
    loss = None
    if eval_path is not None:
        loss = evaluation_loss(model, tokenizer, eval_path, model_config, config, device,
                               precision, chat)  # fmt: skip
    report = None
    if plan.tasks:
        report = run_benchmarks(model, tokenizer, plan, out_dir, device, config.batch_size,
                                precision=precision)  # fmt: skip
    generations: tuple[tuple[str, str], ...] = ()
    if eval_path is not None and config.generations:
        frame = pd.read_parquet(eval_path).head(config.generations)
        prompts, shape = generation_prompts(tokenizer, frame, model_config, chat)
        answers = sample_generations(model, tokenizer, prompts, shape, config.max_new_tokens,
                                     device)  # fmt: skip
        generations = tuple(zip(prompts, answers, strict=True))
    benchmarks = ModelBenchmarks(role, label, loss.loss if loss else None, report, generations)
    return Scoring(loss, benchmarks)


def score_source(source: ModelSource, **kwargs: Any) -> Scoring:
    """A base model (hub id or folder) or a fine-tuned folder."""
    weights = Path(source.config.name) / "model.safetensors"
    measured_on = file_md5(weights) if weights.is_file() else ""  # before loading: what is read
    model = load_model(source.config, kwargs["device"])
    scoring = score_model(model, load_tokenizer(source.config), model_config=source.config,
                          **kwargs)  # fmt: skip
    return replace(scoring, weights_md5=measured_on)


def score_registered(model_uri: str, model_config: ModelConfig, **kwargs: Any) -> Scoring:
    """A registry version (models:/name@alias, models:/name/3), shown to the model the way
    model_config shows examples (template, max_length)."""
    import mlflow

    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model = components["model"].to(kwargs["device"])
    tokenizer = components["tokenizer"]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return score_model(model, tokenizer, model_config=model_config, **kwargs)


def scored(scoring: Scoring, eval_md5: str) -> Scored:
    """What the promotion gate compares and records on the version."""
    report = scoring.benchmarks.report
    scores = report.scores if report else ()
    return Scored(
        loss=scoring.evaluation.loss if scoring.evaluation else math.nan,
        loss_stderr=scoring.evaluation.loss_stderr if scoring.evaluation else None,
        eval_md5=eval_md5,
        bench_fingerprint=report.plan_fingerprint if report else "",
        bench={s.key: Measured(s.value, s.stderr) for s in scores},
        higher_is_better={s.key: s.higher_is_better for s in scores},
    )
