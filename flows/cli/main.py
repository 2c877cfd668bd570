"""`sift`: the command line. Every command loads the one config (file + --set overrides)."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from flows.cli import (
    advise as advise_commands,
    evaluate as evaluate_commands,
    export as export_commands,
    lineage as lineage_commands,
    models as models_commands,
    serve as serve_commands,
    server as server_commands,
)
from flows.cli.common import (
    ConfigOption,
    ProjectOption,
    SetOption,
    console,
    fail,
    load_project,
    resolve_config,
)
from flows.cli.export import (
    ExportFormatOption,
    ExportOption,
    command_line,
    config_words,
    export_json,
    export_lines,
    export_selected,
)
from flows.cli.output import (
    JsonOption,
    VerboseOption,
    print_json,
    print_table,
    stage_lines,
)
from flows.config import DATA_SOURCES, ConfigError, PipelineConfig, check_paths, load_config
from flows.runtime import configure_environment, configure_logging, is_termination, stop_on_sigterm
from steps.tracking import MissingStoreError, TrackingConfig, prepare_store, resolve_tracking_uri

app = typer.Typer(
    help="Sift: data-efficient supervised fine-tuning pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


NewStoreOption = Annotated[
    bool,
    typer.Option(
        "--new-store",
        help="Start a new MLflow store where the configured SQLite file is missing although "
        "mlflow/artifacts holds earlier runs' artifacts (without it the command stops: the "
        "registry's versions and alias history would silently start over).",
    ),
]


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
    new_store: NewStoreOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run the whole pipeline once: ingest → validate → version → embed → select → fine-tune
    → evaluate → register → promote. SIGTERM stops it (exit 143) with its MLflow run KILLED."""
    configure_logging(verbose)
    unread = DATA_SOURCES if data_rev else ()  # --data-rev: the data comes from DVC
    resolved, root = load_project(config, set_, project_dir, skip=unread)
    check_store(resolved.tracking, root, new_store)
    from flows.pipeline import pipeline, summary_rows  # imports Prefect: after the env is set
    from steps.data.ingest import IngestError

    with exit_on_sigterm("sift run"), stage_lines(verbose):
        try:
            result = pipeline(resolved, root, data_rev, new_store)
        except (ValueError, IngestError) as error:
            # A setting or the data at fault: the message names it (Prefect's log above has
            # the traceback); the run stopped before anything downstream of the failure changed.
            raise fail(f"sift run stopped: {error}", 1) from None
        except Exception as error:
            server = unreachable_server(error)
            if server is None:
                raise
            raise fail(f"sift run stopped: {server} did not answer after the task retries: "
                       f"{type(error).__name__}: {error}", 1) from None  # fmt: skip
    if as_json:
        print_json(vars(result))
    else:
        print_table(summary_rows(result), "Sift pipeline run")


def sigterm_line(command: str) -> str:
    """What a command stopped by SIGTERM prints. Steps end whole or not at all: data.dvc is
    restored unless its data was pushed, a registry version is created with all its tags in
    one request, and an alias moves in one request."""
    return (
        f"{command} stopped by SIGTERM: its MLflow run is marked KILLED (if it had started); "
        "data.dvc and the registry hold only what completed steps wrote"
    )


@contextlib.contextmanager
def exit_on_sigterm(command: str) -> Iterator[None]:
    """SIGTERM stops the body (flows.runtime.stop_on_sigterm) and the command exits 143
    (128 + SIGTERM, as a shell reports it) with sigterm_line, without a traceback."""
    try:
        with stop_on_sigterm():
            yield
    except BaseException as error:
        if not is_termination(error):
            raise
        raise fail(sigterm_line(command), 128 + signal.SIGTERM) from None


def check_store(config: TrackingConfig, root: Path, new_store: bool) -> None:
    """The flow's own store check (tracking.prepare_store), before Prefect starts: a store
    deleted while its runs' artifacts remain stops the command at once, in one line."""
    try:
        prepare_store(resolve_tracking_uri(config, root), root, new_store)
    except MissingStoreError as error:
        raise fail(error, 1) from None


# A scheduled run does only new work: it stops after validation on the champion's data and
# otherwise warm-starts selection from the champion. `--set` overrides either.
SCHEDULED_DEFAULTS = ["schedule.skip_unchanged=true", "select.prior=champion"]


def unreachable_server(error: BaseException) -> str | None:
    """The server a failed run could not reach (MLflow or Prefect), named with its URL; None
    for any other failure."""
    import httpx
    import mlflow
    import requests
    from prefect.settings import PREFECT_API_URL

    if isinstance(error, mlflow.exceptions.MlflowException | requests.RequestException):
        return f"the MLflow tracking server {mlflow.get_tracking_uri()}"
    if isinstance(error, httpx.HTTPError):
        return f"the Prefect API {PREFECT_API_URL.value() or '(ephemeral)'}"
    return None


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * 1' (Mondays 03:00).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
    name: Annotated[str, typer.Option(help="Deployment name.")] = "sift-scheduled",
) -> None:
    """Serve the pipeline on a cron schedule (needs a Prefect server: PREFECT_API_URL, or
    `sift server up`). Scheduled runs skip unchanged data and warm-start from the champion
    (schedule.skip_unchanged=true, select.prior=champion) unless --set says otherwise."""
    resolved, root = load_project(config, [*SCHEDULED_DEFAULTS, *(set_ or [])], project_dir)
    from flows.pipeline import pipeline

    pipeline.serve(
        name=name,
        cron=cron,
        pause_on_shutdown=False,
        parameters={"config": resolved.model_dump(), "project_dir": str(root)},
    )


@app.command()
def deploy(
    name: Annotated[
        str, typer.Option(help="A deployment of prefect.yaml: sift-nightly | sift-nightly-k8s.")
    ] = "sift-nightly",
    cron: Annotated[str | None, typer.Option(help="Replace prefect.yaml's schedule.")] = None,
    pool: Annotated[str | None, typer.Option(help="Replace the deployment's work pool.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Create or update a deployment of prefect.yaml with this config as its parameters (a
    worker of its pool runs it): `prefect deploy`, with the checked config. Scheduled runs skip
    unchanged data and warm-start from the champion unless --set says otherwise."""
    import os
    import subprocess
    import sys

    overrides = [*SCHEDULED_DEFAULTS, *(set_ or [])]
    root = project_dir.resolve()
    if not (root / "prefect.yaml").is_file():
        raise fail(f"sift deploy: no prefect.yaml in {root} (run it in a Sift checkout)", 2)
    try:  # paths stay relative: the worker runs in its own checkout (prefect.yaml's pull)
        loaded = load_config(config, overrides, root)
        check_paths(loaded, root)  # here too; the flow checks again in the worker's checkout
    except ValueError as error:  # ConfigError, PathOutsideRoots, a YAML over a limit
        raise fail(error, 2) from None
    parameters = {"config": loaded.model_dump(mode="json"), "project_dir": "."}
    configure_environment(root)  # the servers of `sift server up`, when running
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("sift deploy: no Prefect server (PREFECT_API_URL, or `sift server up`)", 2)
    command = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy",
               "--name", name, "--params", json.dumps(parameters)]  # fmt: skip
    command += ["--cron", cron] if cron else []
    command += ["--pool", pool] if pool else []
    env = {"SIFT_PROJECT_DIR": str(root), **os.environ}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        output = done.stdout[-2000:] + done.stderr[-2000:]
        raise fail(f"sift deploy: prefect deploy failed:\n{output}", 1)
    console.print(f"deployment sift-pipeline/{name} on {os.environ['PREFECT_API_URL']}; start a "
                  f"worker of its pool to run it", markup=False, highlight=False)  # fmt: skip


@app.command("select")
def select_command(
    data: Annotated[
        Path, typer.Option(help="JSONL/JSON/CSV/Parquet/text file to select from (data.source).")
    ],
    out: Annotated[Path, typer.Option(help="Where to write the selection JSON.")],
    prior: Annotated[
        Path | None,
        typer.Option(
            help="Warm start: a selection JSON from an earlier `sift select` (or a pipeline "
            "run's selection/) with its design.npy (and, for fisher-label, label_design.npy) "
            "beside it. Its examples are not picked again and lead the train_ids; "
            "select.budget counts new picks."
        ),
    ] = None,
    export: ExportOption = None,
    export_format: ExportFormatOption = "messages",
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Pick a subset of one file with the config's data, model, embed and select sections,
    without the pipeline (no Prefect, MLflow or DVC): writes ordered ids/rows, per-pick gains
    and the final objective, and design.npy (Σ FᵀF of prior + picks, for a later --prior) in
    --out's folder, with label_design.npy (its label-weighted counterpart) when the pool has
    label factors. Paths are relative to the working directory."""
    import shutil
    import tempfile

    from flows.runtime import state_dir
    from steps.data.ingest import IngestError
    from steps.export import check_destination
    from steps.hardware import resolve_hardware
    from steps.modeling import model_source
    from steps.selection.evidence import select_caution
    from steps.selection.select import load_prior, select_from_file

    configure_logging(verbose)
    root = Path.cwd()
    overrides = [*(set_ or []), f"data.source={json.dumps(str(data))}"]
    resolved = resolve_config(config, overrides, root, skip=("data.source",))  # --data: chosen
    if resolved.select.prior:
        # select.prior names an MLflow run, which this command never reads: say so rather
        # than select cold while the config asks for a warm start.
        raise fail(
            f"select.prior={resolved.select.prior!r} names an MLflow run; `sift select` "
            "warm-starts from a file: --prior FILE (and --set select.prior='')",
            2,
        )
    if line := select_caution(resolved.select):
        typer.echo(line, err=True)  # stderr: stdout stays the one summary line
    try:
        if export is not None:  # before the selection's minutes: a bad format or place
            check_destination(export_format, export, resolved.data, root, "--export")
        device, precision = resolve_hardware(resolved.model)
        prior_ref = None if prior is None else load_prior(prior, str(prior), "--prior")
        model = model_source(resolved.model, state_dir(root))  # a GGUF: converted once
        with tempfile.TemporaryDirectory(prefix="sift-select-") as work:
            ref = select_from_file(
                resolved.data,
                model,
                resolved.embed,
                resolved.select,
                Path(work),
                device=device,
                precision=precision,
                project_dir=root,
                prior=prior_ref,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ref.selection_path, out)
            # design.npy is what a later --prior reads beside the selection JSON
            shutil.copyfile(ref.design_path, out.parent / "design.npy")
            if ref.label_design_path is not None:  # what a later fisher-label --prior reads
                shutil.copyfile(ref.label_design_path, out.parent / "label_design.npy")
        exported = None
        if export is not None:  # the card's command: this one, as its user typed it
            words = [("--data", data), ("--out", out), ("--prior", prior), ("--export", export),
                     ("--export-format", export_format)]  # fmt: skip
            command = command_line("select", words, config_words(config, set_))
            exported = export_selected(out, resolved.data, export_format, export, root, command)
    except (ValueError, IngestError) as error:
        raise fail(error, 2) from None
    if as_json:
        print_json({"examples": ref.examples, "loss_tokens": ref.loss_tokens,
                    "train_examples": ref.train_examples, "selector": ref.selector,
                    "objective": ref.objective, "selection": str(out),
                    "design": str(out.parent / "design.npy"),
                    "export": exported and export_json(exported, export_format)})  # fmt: skip
        return
    console.print(
        f"{ref.examples} examples ({ref.loss_tokens} loss tokens) selected by "
        f"{ref.selector}; final objective {ref.objective:.4f} → {out}"
        + (f" (trains on {ref.train_examples} with the prior's)" if prior is not None else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for line in [] if exported is None else export_lines(exported, export_format):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("validate")
def validate_command(
    data: Annotated[str, typer.Option(help="Pool to check: a file, a folder or a hub dataset id.")],
    eval_data: Annotated[
        str | None, typer.Option(help="Eval split to check (default: data.eval_source).")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Ingest + the validation suite alone (the pipeline's code); exits 1 naming each failed
    expectation. Leaves data/, data.dvc and the DVC remote alone."""
    configure_logging(verbose)
    sources = [f"data.source={json.dumps(data)}"]
    if eval_data is not None:
        sources.append(f"data.eval_source={json.dumps(eval_data)}")
    resolved, root = load_project(config, [*(set_ or []), *sources], project_dir)
    from flows.runtime import state_dir
    from steps.chat_encoding import ChatTemplateError
    from steps.data.ingest import IngestError
    from steps.data.validate import (
        DataValidationError,
        ingest_and_validate,
        quarantine_lines,
        raise_on_failure,
    )
    from steps.gguf import GgufError
    from steps.modeling import model_source

    try:  # the tokenizer the checks use: a GGUF's is its converted folder's
        model = model_source(resolved.model, state_dir(root)).config
    except GgufError as error:
        raise fail(error, 2) from None
    try:
        report = ingest_and_validate(
            resolved.data, resolved.validation, model, root, state_dir(root) / "validate"
        )
        for line in [] if as_json else report.formats:  # how data.format auto read a source
            console.print(line, markup=False, highlight=False)
        accepted = raise_on_failure(report)
    except (IngestError, DataValidationError) as error:
        raise fail(error, 1) from None
    except ChatTemplateError as error:  # data.chat_template (or the model's) cannot serve
        raise fail(error, 2) from None
    if as_json:
        print_json({"valid": True, "pool_rows": accepted.train.rows,
                    "eval_rows": accepted.eval.rows, "quarantined": report.quarantined,
                    "accepted_dir": str(Path(accepted.train.path).parent),
                    "data_docs": str(report.data_docs_path), "formats": list(report.formats),
                    "quarantine": quarantine_lines(report)})  # fmt: skip
        return
    console.print(
        f"valid: {accepted.train.rows} pool and {accepted.eval.rows} eval rows "
        f"({report.quarantined} quarantined); accepted tables in "
        f"{Path(accepted.train.path).parent}; Data Docs: {report.data_docs_path}",
        markup=False,
        highlight=False,
    )
    for line in quarantine_lines(report):
        console.print(f"  {line}", markup=False, highlight=False)


@app.command()
def study(
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
    new_store: NewStoreOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Data-efficiency study: selectors × budgets × seeds (select → fine-tune → evaluate) and
    the synthetic experiment; tables and plots to MLflow, Prefect and study.results_dir."""
    from flows.config import parse_override
    from steps.study.study import load_study_config

    configure_logging(verbose)

    root = project_dir.resolve()
    try:
        resolved = load_study_config(config, [parse_override(item) for item in set_ or []], root)
        check_paths(resolved, root)  # before anything is read or tracked, as `run`
    except ValueError as error:  # ConfigError, StudyConfigError, PathOutsideRoots, ...
        raise fail(error, 2) from None
    model = Path(resolved.model.name)
    if not model.is_absolute() and (root / model).exists():  # project-relative, as `run`
        resolved = resolved.model_copy(
            update={"model": resolved.model.model_copy(update={"name": str(root / model)})}
        )
    configure_environment(root)
    check_store(resolved.tracking, root, new_store)
    from flows.pipeline import summary_rows as study_rows
    from flows.study import study as study_flow

    with exit_on_sigterm("sift study"), stage_lines(verbose):
        result = study_flow(resolved, root, new_store)
    if as_json:
        print_json(vars(result))
    else:
        print_table(study_rows(result), "Sift study")


@app.command("show-config")
def show_config(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved config (defaults + file + --set) as YAML."""
    import yaml

    try:
        loaded: PipelineConfig = load_config(config, set_)
    except ConfigError as error:
        raise fail(error, 2) from None
    console.print(yaml.safe_dump(loaded.model_dump(), sort_keys=False))


for commands in (
    advise_commands,
    evaluate_commands,
    export_commands,
    lineage_commands,
    models_commands,
    serve_commands,
    server_commands,
):
    commands.add_commands(app)
