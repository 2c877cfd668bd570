"""What every `sift` command shares: the console, the config options, one-line failures."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.config import PipelineConfig, check_paths, load_config, resolve_paths
from flows.runtime import configure_environment

# soft_wrap: a line is never broken by rich (a log or a pipe keeps it whole; a terminal
# wraps it itself); tables fold to the width (flows/cli/output.py print_table).
console = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML file overriding the defaults (see configs/); at most 256 KiB. A symlink "
        "must lead inside the project (a file named there) or the folder it is named in.",
    ),
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


def fail(message: object, code: int) -> typer.Exit:
    """Print one red message, unwrapped (it names the key or file: keep it on one line) and
    not read as markup (messages quote values such as ['a', 'b']); the exit to raise."""
    console.print(str(message), style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def resolve_config(
    config_path: Path | None,
    overrides: list[str] | None,
    project_dir: Path,
    skip: Collection[str] = (),
    check: bool = True,
) -> PipelineConfig:
    """The config with project-relative paths made absolute and every local path a setting
    names checked inside data.allowed_roots (flows/config.py check_paths); a bad one exits 2
    naming it, before anything is read or tracked. skip: settings the command does not read
    from the config (flows/config.py check_paths); check=False only for a command that reads
    none of the paths the settings name (the registry commands)."""
    try:
        resolved = resolve_paths(load_config(config_path, overrides, project_dir), project_dir)
        if check:
            check_paths(resolved, project_dir, skip)
    except ValueError as error:  # ConfigError, PathOutsideRoots, a YAML over a limit
        raise fail(error, 2) from None
    return resolved


def load_project(
    config_path: Path | None,
    overrides: list[str] | None,
    project_dir: Path,
    skip: Collection[str] = (),
    check: bool = True,
):
    project_dir = project_dir.resolve()
    config = resolve_config(config_path, overrides, project_dir, skip, check)
    configure_environment(project_dir)
    return config, project_dir
