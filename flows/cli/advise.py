"""`sift advise`: before any training, the selection budget past which returns flatten."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ConfigOption, SetOption, console, fail, resolve_config
from flows.cli.output import JsonOption, VerboseOption, print_json
from flows.runtime import configure_logging, state_dir


def advise_command(
    data: Annotated[
        Path, typer.Option(help="JSONL/JSON/CSV/Parquet/text file to select from (data.source).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for advice.json and advice.png (default: .sift/advise/)."),
    ] = None,
    max_budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Walk the curves up to this many examples (default: every candidate, the "
            "pool less the 10% held out for the leverage curve).",
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Suggest a selection budget from the information curve of select.selector over one
    file and the leverage of held-out pool examples, before any training (the data, model,
    embed and select sections as `sift select`; select.budget is what it suggests).
    Prints the budget and the reason; writes advice.json (curves, the rule's numbers) and
    advice.png. Paths are relative to the working directory."""
    from steps.data.ingest import IngestError
    from steps.hardware import resolve_hardware
    from steps.modeling import model_source
    from steps.selection.advise import advise_file, write_advice

    configure_logging(verbose)
    root = Path.cwd()
    overrides = [*(set_ or []), f"data.source={json.dumps(str(data))}"]
    resolved = resolve_config(config, overrides, root, skip=("data.source",))  # --data: chosen
    if resolved.select.prior:  # the advisor walks a cold selection: say so, never ignore it
        raise fail(f"select.prior={resolved.select.prior!r}: `sift advise` walks a cold "
                   "selection; --set select.prior=''", 2)  # fmt: skip
    if not data.is_file():
        raise fail(f"--data={str(data)!r}: no such file", 2)
    out_dir = out if out is not None else state_dir(root) / "advise"
    try:
        device, precision = resolve_hardware(resolved.model)
        model = model_source(resolved.model, state_dir(root)).config  # a GGUF: its folder
        with tempfile.TemporaryDirectory(prefix="sift-advise-") as work:
            advice = advise_file(
                resolved.data,
                model,
                resolved.embed,
                resolved.select,
                Path(work),
                device=device,
                precision=precision,
                project_dir=root,
                max_budget=max_budget,
                setting="--max-budget",
            )
    except (ValueError, IngestError) as error:
        raise fail(error, 2) from None
    json_path, plot_path = write_advice(advice, out_dir)
    if as_json:
        numbers = {
            key: value
            for key, value in vars(advice).items()
            if isinstance(value, str | int | float | bool)
        }  # the curves: advice.json
        print_json({**numbers, "advice": str(json_path), "plot": str(plot_path)})  # fmt: skip
        return
    verdict = "suggested budget" if advice.flattened else "no knee found; walked"
    console.print(
        f"{verdict}: {advice.examples} examples ({advice.loss_tokens} loss tokens) of "
        f"{advice.candidates} candidates, {advice.selector}: {advice.reason}\n"
        f"curves → {json_path}, {plot_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
    app.command("advise")(advise_command)
