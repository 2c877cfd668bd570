"""`sift evaluate`: benchmarks of any model (a folder, a hub id or a registry version) with
the pipeline's own evaluation code, offline on local task files."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ConfigOption, ProjectOption, SetOption, fail, load_project
from flows.cli.output import (
    JsonOption,
    VerboseOption,
    note,
    print_json,
    print_table,
)
from flows.runtime import configure_logging


def evaluate_command(
    model: Annotated[
        str,
        typer.Option(
            help="A local folder, a .gguf file, a hub id, or a registry version: "
            "models:/NAME@ALIAS or models:/NAME/VERSION (read from the config's MLflow store)."
        ),
    ],
    suite: Annotated[
        str | None, typer.Option(help="none | quick | standard | real | a group YAML (eval.suite).")
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
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score a model on the configured benchmark suite and print a per-task table; writes
    lm-eval's results JSON, its per-sample log and an HTML report. Every task, its YAML and
    data are checked before the model is loaded."""
    configure_logging(verbose)
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
    from steps.gguf import GgufError
    from steps.hardware import resolve_hardware
    from steps.modeling import model_source

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
            # --model is the whole choice: a config's model.gguf_file does not follow it
            chosen = resolved.model.model_copy(
                update={"name": _local(model, root), "gguf_file": None}
            )
            source = model_source(chosen, state_dir(root))  # a .gguf: its converted folder
            scoring = score_source(source, **common)
    except (OSError, GgufError) as error:  # a folder that is no model, a hub id offline
        raise fail(f"sift evaluate: --model {model}: {error}", 1) from None
    files = write_report([scoring.benchmarks], destination, f"{model}: benchmarks")
    rows = score_table_rows([scoring.benchmarks])
    notes = report_notes([scoring.benchmarks])
    if as_json:
        header = rows[0]
        report = scoring.benchmarks.report
        print_json({"model": model,
                    "scores": [asdict(score) for score in report.scores] if report else [],
                    "loss": scoring.evaluation.loss if scoring.evaluation else None,
                    "rows": [dict(zip(header, row, strict=True)) for row in rows[1:]],
                    "notes": notes, "report": str(files.html_path)})  # fmt: skip
        return
    print_table(rows[1:], f"sift evaluate {model}", header=rows[0])
    for line in notes:
        note(line)
    note(f"report {files.html_path}")


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
