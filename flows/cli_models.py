"""`sift models`, `sift promote`, `sift rollback`: versions and the champion, by hand."""

from __future__ import annotations

import typer


def add_commands(app: typer.Typer) -> None:
    """Registers this module's commands on the `sift` app."""
