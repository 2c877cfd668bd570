"""What `sift` commands print where: results on stdout (a table, or one JSON document with
--json), stage lines and progress on stderr, library logs only with --verbose."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show the libraries' logs on stderr (Prefect task logs, MLflow, DVC, Great "
        "Expectations, transformers, lm-eval); by default one line per stage and progress bars.",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the result as one JSON document on stdout and nothing else there."
    ),
]

# Rows printed to a pipe or a log are never wrapped: each holds its whole value, so a
# script finds a task name or path on one line. A terminal gets its own width.
UNWRAPPED_WIDTH = 100_000

stderr = Console(stderr=True)


def print_table(
    rows: Sequence[Sequence[object]], title: str, header: Sequence[str] | None = None
) -> None:
    """A table on stdout: folded to the terminal's width there, one line per row elsewhere."""
    out = Console()
    if not out.is_terminal:  # print(width=) is capped at the console's width: set it here
        out = Console(width=UNWRAPPED_WIDTH)
    table = Table(*(header or ()), title=title, show_header=header is not None)
    if header is None:
        for _ in rows[0] if rows else ():
            table.add_column()
    for column in table.columns:
        column.overflow = "fold"  # full names and numbers, wrapped rather than cut
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    out.print(table)


def print_json(document: Any) -> None:
    """One JSON document on stdout (values JSON lacks, such as paths, as strings)."""
    typer.echo(json.dumps(document, indent=2, default=str))


def note(line: str) -> None:
    """A line for the person watching (stderr): never mixed into a command's results."""
    stderr.print(line, markup=False, highlight=False, soft_wrap=True)


class StageLines(logging.Handler):
    """One stderr line per finished Prefect task run (`embed  done in 41.2 s`, `cached`,
    `failed`), from the engine's "Finished in state ..." record, which it logs for every
    task run whatever the console shows."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.started = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        name = getattr(record, "task_name", None)
        if name is None or not message.startswith("Finished in state "):
            return
        state = message.removeprefix("Finished in state ").split("(")[0]
        elapsed = _run_seconds() or time.monotonic() - self.started
        self.started = time.monotonic()
        outcome = {"Completed": f"done in {elapsed:.1f} s", "Cached": "cached"}.get(
            state, state.lower()
        )
        sys.stderr.write(f"{name:<16} {outcome}\n")
        sys.stderr.flush()


def _run_seconds() -> float | None:
    """Seconds since the finishing task run started (the engine logs inside its context);
    None outside one, or before it started (a cached result)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    start = context.task_run.start_time if context is not None else None
    if start is None:
        return None
    return (datetime.now(UTC) - start).total_seconds()


class FlowNotes(logging.Handler):
    """The lines Sift's flows print (a selector's caution, quarantined rows, why a run
    stopped): log_prints sends them to Prefect's run logger, whose console shows only
    warnings by default; these are for the person watching, so they go to stderr."""

    FLOWS_DIR = str(Path(__file__).resolve().parents[1])

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        # print_as_log logs with stacklevel=2: the record's path is the print's caller
        if record.levelno < logging.WARNING and record.pathname.startswith(self.FLOWS_DIR):
            note(record.getMessage())


@contextmanager
def stage_lines(verbose: bool) -> Iterator[None]:
    """Stage lines and the flows' own notes for the body (Prefect flows), unless --verbose
    shows Prefect's own log (which holds both)."""
    handlers = (
        ()
        if verbose
        else (
            (logging.getLogger("prefect.task_runs"), StageLines()),
            (logging.getLogger("prefect.flow_runs"), FlowNotes()),
        )
    )
    for logger, handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)

