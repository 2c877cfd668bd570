"""`sift evaluate`: benchmarks of any model (a folder, a hub id or a registry version) with
the pipeline's own evaluation code, offline on local task files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import ConfigOption, ProjectOption, SetOption, console, fail, load_project


def evaluate_command(
    model: Annotated[
        str,
        typer.Option(
            help="A local folder, a hub id, or a registry version: models:/NAME@ALIAS or "
            "models:/NAME/VERSION (read from the config's MLflow store)."
        ),
    ],
    suite: Annotated[
        str | None, typer.Option(help="none | quick | standard | a group YAML (eval.suite).")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="More tasks, comma-separated (eval.tasks).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Documents per task (eval.limit).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the report, results.json and samples.jsonl."),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Score a model on the configured benchmark suite and print a per-task table; writes
    lm-eval's results JSON, its per-sample log and an HTML report. Every task, its YAML and
    data are checked before the model is loaded."""
    overrides = list(set_ or [])
    if suite is not None:
        overrides.append(f"eval.suite={json.dumps(suite)}")
    if tasks is not None:
        overrides.append(f"eval.tasks={json.dumps([t for t in tasks.split(',') if t])}")
    if limit is not None:
        overrides.append(f"eval.limit={limit}")
    # --model replaces model.name: the user's own choice, as `sift select --data`
    resolved, root = load_project(config, overrides, project_dir, skip=("model.name",))
    from flows.runtime import state_dir
    from steps.evaluation.report import report_notes, score_table_rows, write_report
    from steps.evaluation.score import score_source
    from steps.evaluation.suites import BenchmarkError, plan_benchmarks
    from steps.modeling import model_source, resolve_hardware

    try:
        plan = plan_benchmarks(resolved.eval, root)
    except BenchmarkError as error:
        raise fail(f"sift evaluate: {error}", 2) from None
    if not plan.tasks:
        raise fail("sift evaluate: no tasks (eval.suite=none and no eval.tasks)", 2)
    device, precision = resolve_hardware(resolved.model)
    destination = out or state_dir(root) / "evaluations" / re.sub(r"[^\w.@-]+", "_", model)
    common = {
        "role": "challenger", "label": model, "eval_path": None, "config": resolved.eval,
        "plan": plan, "out_dir": destination, "device": device, "precision": precision,
    }  # fmt: skip
    try:
        if model.startswith("models:/"):
            scoring = _registered(model, resolved, root, common)
        else:
            source = model_source(resolved.model.model_copy(update={"name": _local(model, root)}))
            scoring = score_source(source, **common)
    except OSError as error:  # a folder that is no model, a hub id offline
        raise fail(f"sift evaluate: --model {model}: {error}", 1) from None
    files = write_report([scoring.benchmarks], destination, f"{model}: benchmarks")
    rows = score_table_rows([scoring.benchmarks])
    table = Table(*rows[0], title=f"sift evaluate {model}")
    for column in table.columns:
        column.overflow = "fold"  # full task names and scores, wrapped rather than cut
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    for note in report_notes([scoring.benchmarks]):
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report {files.html_path}", markup=False, highlight=False)


def _local(model: str, root: Path) -> str:
    path = Path(model).expanduser()
    candidate = path if path.is_absolute() else root / path
    return str(candidate.resolve()) if candidate.exists() else model


def _registered(model: str, resolved, root: Path, common: dict):
    import mlflow

    from steps import tracking
    from steps.evaluation.score import score_registered

    uri = tracking.resolve_tracking_uri(resolved.tracking, root)
    try:
        tracking.require_store(uri)
    except ValueError as error:
        raise fail(error, 1) from None
    tracking.use_tracking(uri)
    try:
        return score_registered(model, resolved.model, **common)
    except mlflow.exceptions.MlflowException as error:
        raise fail(f"sift evaluate: --model {model}: {error.message}", 1) from None


def add_commands(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
