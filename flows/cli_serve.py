"""`sift serve-model`: a registered version behind `mlflow models serve` on 127.0.0.1."""

from __future__ import annotations

import typer


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
