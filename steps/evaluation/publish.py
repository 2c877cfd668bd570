"""Evaluation results to MLflow: benchmark metrics with stderr, lm-eval's results and
per-sample logs, sample generations as a table, and the report comparing the models."""

from __future__ import annotations

from pathlib import Path

import mlflow

from steps import tracking
from steps.evaluation.benchmarks import ModelBenchmarks
from steps.evaluation.report import ReportFiles, write_report
from steps.evaluation.score import Scoring

PREFIXES = {"challenger": "bench", "base": "bench_base", "champion": "bench_champion"}


def bench_metrics(benchmarks: ModelBenchmarks) -> dict[str, float]:
    """bench/<task>/<metric>[/<filter>] and …_stderr, prefixed by the model's role."""
    prefix = PREFIXES[benchmarks.role]
    metrics: dict[str, float] = {}
    for score in benchmarks.report.scores if benchmarks.report else ():
        metrics[f"{prefix}/{score.key}"] = score.value
        if score.stderr is not None:
            metrics[f"{prefix}/{score.key}_stderr"] = score.stderr
    return metrics


def _log_model(run_id: str, benchmarks: ModelBenchmarks) -> dict[str, float]:
    metrics = bench_metrics(benchmarks)
    tracking.log_metrics(run_id, metrics)
    report = benchmarks.report
    if report is not None:
        for path in (report.results_path, report.samples_path):
            tracking.log_artifact(run_id, path, f"benchmarks/{benchmarks.role}")
    if benchmarks.generations:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_table(
                {
                    "prompt": [p for p, _ in benchmarks.generations],
                    "answer": [a for _, a in benchmarks.generations],
                    "model": [benchmarks.label] * len(benchmarks.generations),
                },
                artifact_file=f"generations/{benchmarks.role}.json",
            )
    return metrics


def log_scoring(run_id: str, base: Scoring, challenger: Scoring) -> tuple[str, ...]:
    """Logs both models' benchmarks; returns the challenger's metric keys (linked to its
    logged model when it is registered)."""
    _log_model(run_id, base.benchmarks)
    return tuple(_log_model(run_id, challenger.benchmarks))


def write_run_report(
    run_id: str,
    out_dir: Path,
    model_name: str,
    version: str,
    scorings: tuple[Scoring, Scoring, Scoring | None],
) -> ReportFiles:
    """The HTML report and chart of base / challenger / champion, logged under report/."""
    base, challenger, champion = scorings
    models = [base.benchmarks, challenger.benchmarks]
    if champion is not None:
        _log_model(run_id, champion.benchmarks)
        models.append(champion.benchmarks)
    files = write_report(models, out_dir, f"{model_name} v{version}: evaluation")
    for path in (files.html_path, files.chart_path):
        if path is not None:
            tracking.log_artifact(run_id, str(path), "report")
    return files
