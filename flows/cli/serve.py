"""`sift serve-model`: a registered version behind `mlflow models serve` on 127.0.0.1."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ConfigOption, ProjectOption, SetOption, console, fail, resolve_config
from flows.runtime import configure_environment, state_dir, use_recorded_servers
from steps.modeling import ModelConfig, load_tokenizer, model_source, prompt_shape
from steps.registry import serve
from steps.tracking import require_store, resolve_tracking_uri, use_tracking

# What the curl example asks; a GSM8K-style question shown in the model's prompt template.
EXAMPLE_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # copies as printed


def example_prompt(model: ModelConfig, root: Path) -> str:
    """EXAMPLE_QUESTION shown as training showed prompts (steps/modeling.py prompt_shape).
    Only the chat format needs the base model's tokenizer (its chat template), so only it
    loads one (a GGUF's from its converted folder)."""
    if model.prompt_format == "template":
        return model.prompt_template.format(prompt=EXAMPLE_QUESTION)
    base = model_source(model, state_dir(root)).config
    return prompt_shape(load_tokenizer(base), model).text(EXAMPLE_QUESTION)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill <pid>` stops the server the way Ctrl-C does


def serve_model(
    model: Annotated[
        str,
        typer.Argument(
            help="<name>@<alias>, <name>/<version> or a models:/ URI, e.g. sift-gsm8k@champion."
        ),
    ],
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port to listen on (make ui has 5000).")
    ] = serve.DEFAULT_PORT,
    host: Annotated[
        str,
        typer.Option(help="Interface to bind; 0.0.0.0 opens the server to the network."),
    ] = "127.0.0.1",
    config: ConfigOption = None,
    set_: SetOption = None,
    project_dir: ProjectOption = Path("."),
) -> None:
    """Serve a registered version with `mlflow models serve --env-manager local` from the
    configured registry (tracking.tracking_uri) until Ctrl-C; POST prompts to /invocations."""
    root = project_dir.resolve()
    resolved = resolve_config(config, set_, root, check=False)  # reads no setting's paths
    use_recorded_servers(root)  # the MLflow server of `sift server up`, when running
    tracking_uri = resolve_tracking_uri(resolved.tracking, root)
    try:
        require_store(tracking_uri)
        use_tracking(tracking_uri)
        served = serve.resolve_model(model)
        serve.check_port_free(host, port)
    except ValueError as error:  # a ServeError, or require_store's
        raise fail(error, 2) from None

    configure_environment(root)  # only now: a refused model leaves the project untouched
    url = serve.base_url(host, port)
    prompt = example_prompt(resolved.model, root)
    say(f"serving {served.describe()} (run {served.run_id}) at {url}")
    process = serve.start_server(
        serve.serve_command(served, host, port), serve.server_env(tracking_uri)
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.wait_until_ready(url, process, timeout_s=None)
        say("ready; Ctrl-C stops it. Try:")
        say(serve.curl_example(url, prompt))
        code = process.wait()
    except KeyboardInterrupt:
        serve.stop_server(process)
        say(f"stopped the server on {url}")
        return
    except serve.ServeError as error:
        raise fail(error, 1) from None
    finally:
        serve.stop_server(process)  # a no-op once it has exited
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise fail(f"mlflow models serve exited with code {code}", 1)


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
    app.command("serve-model")(serve_model)
