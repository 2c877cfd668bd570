"""`sift`: the command line. Every command loads the one config (file + --set overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.config import ConfigError, PipelineConfig, load_config, resolve_paths
from flows.runtime import configure_environment
from steps.selection.selectors import SELECTORS

app = typer.Typer(
    help="Sift: data-efficient supervised fine-tuning pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file overriding the defaults (see configs/)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one key, e.g. --set select.budget=0.05 (repeatable)."
    ),
]
ProjectOption = Annotated[
    Path,
    typer.Option("--project-dir", help="Project root: holds data/, data.dvc, mlflow/ and .sift/."),
]


def _load(config_path: Path | None, overrides: list[str] | None, project_dir: Path):
    project_dir = project_dir.resolve()
    try:
        config = resolve_paths(load_config(config_path, overrides), project_dir)
    except ConfigError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    configure_environment(project_dir)
    return config, project_dir


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
    data_rev: Annotated[
        str | None,
        typer.Option(
            help="Git revision (commit, tag, branch) whose data.dvc names the data to use, "
            "read through dvc.api instead of ingesting: reproduces that run's data and selection."
        ),
    ] = None,
) -> None:
    """Run the whole pipeline once: ingest → validate → version → embed → select → fine-tune
    → evaluate → register → promote."""
    resolved, root = _load(config, set_, project_dir)
    from flows.pipeline import pipeline, summary_rows  # imports Prefect: after the env is set
    from steps.data.ingest import IngestError

    try:
        result = pipeline(resolved, root, data_rev)
    except (ValueError, IngestError) as error:
        # A setting or the data at fault: the message names it (Prefect's log above has the
        # traceback); the run stopped before anything downstream of the failure changed.
        console.print(f"[red]sift run stopped: {error}[/red]")
        raise typer.Exit(1) from None
    table = Table(title="Sift pipeline run", show_header=False)
    for name, value in summary_rows(result):
        table.add_row(name, value)
    console.print(table)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * 1' (Mondays 03:00).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
    name: Annotated[str, typer.Option(help="Deployment name.")] = "sift-scheduled",
) -> None:
    """Serve the pipeline on a cron schedule (needs a Prefect server: PREFECT_API_URL)."""
    resolved, root = _load(config, set_, project_dir)
    from flows.pipeline import pipeline

    pipeline.serve(
        name=name,
        cron=cron,
        pause_on_shutdown=False,
        parameters={"config": resolved.model_dump(), "project_dir": str(root)},
    )


@app.command("select")
def select_command(
    data: Annotated[Path, typer.Option(help="JSONL/JSON/CSV/Parquet/text file to select from.")],
    out: Annotated[Path, typer.Option(help="Where to write the selection JSON.")],
    model: Annotated[str, typer.Option(help="Hub id or local path of the base model.")] = (
        "assets/models/stories260K"
    ),
    budget: Annotated[
        float, typer.Option(help="Examples to pick: a count, or a fraction < 1.")
    ] = 0.1,
    selector: Annotated[
        str,
        typer.Option(help=f"One of: {', '.join(SELECTORS)}."),
    ] = "fisher",
    ridge: Annotated[float, typer.Option(help="Ridge λ of log det(λI + V_S).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for seeded selectors.")] = 0,
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="Field holding the response.")] = "response",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    prior: Annotated[
        Path | None,
        typer.Option(
            help="Warm start: a selection JSON from an earlier `sift select` (or a pipeline "
            "run's selection/) with its design.npy beside it. Its examples are not picked "
            "again and lead the train_ids; --budget counts new picks."
        ),
    ] = None,
) -> None:
    """Pick a subset of one file with a selector, without the pipeline (no Prefect, MLflow
    or DVC): writes ordered ids/rows, per-pick gains and the final objective, and
    design.npy (Σ FᵀF of prior + picks, for a later --prior) in --out's folder."""
    import shutil
    import tempfile

    from pydantic import ValidationError

    from steps.data.ingest import IngestError
    from steps.modeling import ModelConfig, resolve_device
    from steps.selection.select import SelectConfig, load_prior, select_from_file

    try:
        config = SelectConfig(selector=selector, budget=budget, ridge=ridge, seed=seed)
        model_config = ModelConfig(name=model, device=device)  # type: ignore[arg-type]
        prior_ref = None if prior is None else load_prior(prior, str(prior), "--prior")
        with tempfile.TemporaryDirectory(prefix="sift-select-") as work:
            ref = select_from_file(
                str(data),
                model_config,
                config,
                Path(work),
                resolve_device(model_config.device),
                prompt_field,
                response_field,
                prior_ref,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ref.selection_path, out)
            # design.npy is what a later --prior reads beside the selection JSON
            shutil.copyfile(ref.design_path, out.parent / "design.npy")
    except ValidationError as error:
        problems = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in error.errors())
        console.print(f"[red]{problems}[/red]")
        raise typer.Exit(2) from None
    except (ValueError, IngestError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    console.print(
        f"{ref.examples} examples ({ref.loss_tokens} loss tokens) selected by "
        f"{ref.selector}; final objective {ref.objective:.4f} → {out}"
        + (f" (trains on {ref.train_examples} with the prior's)" if prior is not None else "")
    )


@app.command("validate")
def validate_command(
    data: Annotated[str, typer.Option(help="Pool to check: a file, a folder or a hub dataset id.")],
    eval_data: Annotated[
        str | None, typer.Option(help="Eval split to check (default: data.eval_source).")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Ingest + the validation suite alone (the pipeline's code); exits 1 naming each failed
    expectation. Leaves data/, data.dvc and the DVC remote alone."""
    import json

    sources = [f"data.source={json.dumps(data)}"]
    if eval_data is not None:
        sources.append(f"data.eval_source={json.dumps(eval_data)}")
    resolved, root = _load(config, [*(set_ or []), *sources], project_dir)
    from flows.runtime import state_dir
    from steps.data.ingest import IngestError
    from steps.data.validate import DataValidationError, ingest_and_validate, raise_on_failure

    try:
        report = ingest_and_validate(
            resolved.data, resolved.validation, resolved.model, root, state_dir(root) / "validate"
        )
        accepted = raise_on_failure(report)
    except (IngestError, DataValidationError) as error:
        console.print(str(error), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"valid: {accepted.train.rows} pool and {accepted.eval.rows} eval rows "
        f"({report.quarantined} quarantined); accepted tables in "
        f"{Path(accepted.train.path).parent}; Data Docs: {report.data_docs_path}",
        markup=False,
        highlight=False,
    )


@app.command()
def study(
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Data-efficiency study: selectors × budgets × seeds (select → fine-tune → evaluate) and
    the synthetic experiment; tables and plots to MLflow, Prefect and study.results_dir."""
    from flows.config import parse_override
    from steps.study.study import StudyConfigError, load_study_config

    root = project_dir.resolve()
    try:
        resolved = load_study_config(config, [parse_override(item) for item in set_ or []])
    except (ConfigError, StudyConfigError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    model = Path(resolved.model.name)
    if not model.is_absolute() and (root / model).exists():  # project-relative, as `run`
        resolved = resolved.model_copy(
            update={"model": resolved.model.model_copy(update={"name": str(root / model)})}
        )
    configure_environment(root)
    from flows.study import study as study_flow
    from flows.study import summary_rows as study_rows

    result = study_flow(resolved, root)
    table = Table(title="Sift study", show_header=False)
    for name, value in study_rows(result):
        table.add_row(name, value)
    console.print(table)


@app.command("show-config")
def show_config(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (defaults + file + --set) as YAML."""
    import yaml

    try:
        loaded: PipelineConfig = load_config(config, set_)
    except ConfigError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    console.print(yaml.safe_dump(loaded.model_dump(), sort_keys=False))
