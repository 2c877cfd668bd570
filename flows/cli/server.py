"""`sift server up|down|status`: Prefect + MLflow servers for this project, on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import typer

from flows import servers
from flows.cli.common import ConfigOption, ProjectOption, SetOption, console, fail

server_app = typer.Typer(
    help="Prefect and MLflow servers on this machine (127.0.0.1); while they run, `sift` "
    "commands in the project use them (see infra/README.md).",
    no_args_is_help=True,
)


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # copies as printed


@server_app.command("up")
def up_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Start a Prefect and an MLflow server for this project; wait until both are healthy.

    Settings: --set server.prefect_port=4200, server.mlflow_port=5000 (0: a free port),
    server.database_url=postgresql://USER@HOST:PORT/NAME, server.artifacts_uri=s3://BUCKET/PREFIX;
    or --config FILE with a `server:` section.
    """
    root = project_dir.resolve()
    try:
        server_config = servers.load_server_config(config, set_ or [])
    except servers.ServerError as error:
        raise fail(error, 2) from None
    try:
        started = servers.up(server_config, root)
    except servers.ServerError as error:  # a port, the database, a server that did not start
        raise fail(error, 1) from None
    prefect, mlflow = (started.state["servers"][name] for name in ("prefect", "mlflow"))
    say(f"Prefect UI  {prefect['url']}  (API {prefect['client_url']}; pid {prefect['pid']}, "
        f"healthy after {started.seconds['prefect']:.1f} s)")  # fmt: skip
    say(f"MLflow UI   {mlflow['url']}  (tracking URI; pid {mlflow['pid']}, "
        f"healthy after {started.seconds['mlflow']:.1f} s)")  # fmt: skip
    say(f"stores: {started.state['stores']}")
    say(f"logs: {Path(prefect['log']).parent}/*.log; `sift run` here now uses these servers; "
        "`sift server down` stops them")  # fmt: skip


@server_app.command("down")
def down_command(project_dir: ProjectOption = Path(".")) -> None:
    """Stop the servers `sift server up` started for this project, and only those.

    Removes their record; with nothing recorded it says so and exits 0.
    """
    stopped = servers.down(project_dir.resolve())
    if not stopped:
        say("no servers recorded for this project: nothing to stop")
    for item in stopped:
        detail = {"stopped": "stopped", "not running": "was not running",
                  "not ours": "is now another process: left alone"}[item.outcome]  # fmt: skip
        say(f"{item.name} server (pid {item.pid}) {detail}")


@server_app.command("status")
def status_command(project_dir: ProjectOption = Path(".")) -> None:
    """Which recorded servers run and answer their health check, and where.

    Exit code 1 when a recorded server is down or unhealthy, 3 when none is recorded.
    """
    reported = servers.status(project_dir.resolve())
    if reported is None:
        raise fail("no servers recorded for this project: `sift server up` starts them", 3)
    for item in reported:
        state = "healthy" if item.healthy else ("unhealthy" if item.running else "not running")
        say(f"{item.name:<8} {state:<12} {item.url}  pid {item.pid}")
    if not all(item.healthy for item in reported):
        raise fail("a recorded server is down: `sift server down`, then `sift server up`", 1)


def add_commands(app: typer.Typer) -> None:
    """Registers `sift server ...` on the `sift` app."""
    app.add_typer(server_app, name="server")
