"""`sift lineage`: a registered version traced to its run, data, code and base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import ConfigOption, ProjectOption, SetOption, console, fail, resolve_config
from flows.config import PipelineConfig
from flows.runtime import use_recorded_servers
from steps import tracking
from steps.registry.lineage import LineageError, lineage


def lineage_command(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. sift-gsm8k.")],
    ref: Annotated[
        str, typer.Argument(help="A version number or @alias.", metavar="[VERSION|@ALIAS]")
    ] = "@champion",
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Trace a registered version: run → data (DVC md5s, the data.dvc commit, the command
    that reproduces it) → code → flow run → base model, and what changed against @champion.
    Reads the MLflow store of the config (tracking.tracking_uri) like `sift run`."""
    root = project_dir.resolve()
    resolved = resolve_config(config, set_, root, check=False)  # reads no setting's paths
    use_recorded_servers(root)  # the MLflow server of `sift server up`, when running
    uri = tracking.resolve_tracking_uri(resolved.tracking, root)
    try:
        tracking.require_store(uri)  # a lineage lookup must change nothing
    except ValueError as error:
        raise fail(error, 1) from None
    tracking.use_tracking(uri)
    try:
        report = lineage(name, ref, root, PipelineConfig)
    except LineageError as error:
        raise fail(error, 1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in report_lines(report):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The chain, one link per line, then the differences from the champion."""
    model, run, data, code = report["model"], report["run"], report["data"], report["code"]
    flow_run, base, selection = report["flow_run"], report["base_model"], report["selection"]
    aliases = f" @{', @'.join(model['aliases'])}" if model["aliases"] else ""
    dirty = {"true": " (dirty: uncommitted changes)", "false": " (clean)"}.get(code["dirty"], "")
    lines = [
        f"model      {model['name']} v{model['version']}{aliases}  weights md5 "
        f"{model['weights_md5']}  logged model {model['model_id']}",
        f"run        {run['id']} ({run['name']}, {run['status']})",
        f"data       dvc md5 {data['md5']} (train {data['train_md5']}, eval {data['eval_md5']})",
        f"           data.dvc at {data['data_rev'] or 'no commit of data.dvc holds this md5'}",
        f"           reproduce: {data['reproduce']}",
        f"code       git {code['git_sha']}{dirty}",
        f"flow run   {flow_run['id']}  {flow_run['url'] or '(no Prefect server: no UI link)'}",
        f"base model {base['id']}  md5 {base['md5']}",
        f"selection  {selection['selector']}, budget {_budget(selection)}, "
        f"{selection['examples']} examples, prior run {selection['prior_run']}",
        "metrics    " + ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()),
    ]
    return lines + _change_lines(report["champion"], model["version"])


def _budget(selection: dict[str, Any]) -> str:
    if selection.get("budget_tokens") is not None:
        return f"{selection['budget_tokens']} loss tokens"
    return str(selection["budget"])


def _change_lines(changes: dict[str, Any] | None, version: str) -> list[str]:
    if changes is None:
        return ["vs champion: there is no champion"]
    if changes["champion_version"] == version:
        return ["vs champion: this version is the champion"]
    lines = [f"vs champion v{changes['champion_version']}:"]
    data = changes["data"] or {"dvc.md5": None}
    for key, pair in data.items():
        what = "same" if pair is None else f"{pair['champion']} -> {pair['this']}"
        lines.append(f"  data {key}: {what}")
    for key, pair in changes["config"].items():
        lines.append(f"  config {key}: {pair['champion']} -> {pair['this']}")
    if not changes["config"]:
        lines.append("  config: same")
    selector = changes["selector"]
    lines.append(
        f"  selector: {selector['champion']} -> {selector['this']}" if selector else
        "  selector: same"
    )  # fmt: skip
    for key, pair in changes["metrics"].items():
        lines.append(
            f"  {key}: {pair['champion']:.4f} -> {pair['this']:.4f} ({pair['delta']:+.4f})"
        )
    return lines


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
    app.command("lineage")(lineage_command)
