"""`sift lineage`: a registered version traced to its run, data, code and base model."""

from __future__ import annotations

import typer


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
