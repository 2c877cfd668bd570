"""ruff, mypy and the strict docs build, as tests: `make test` runs them in a pytest-xdist
worker beside the rest of the suite instead of one after the other before it (mypy alone
takes about a minute from a fresh clone). `make lint` and `make docs-check` run the same
commands by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _passes(*command: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


def test_ruff_finds_nothing() -> None:
    _passes(str(BIN / "ruff"), "check", ".")


@pytest.mark.slow  # about a minute with a cold cache
def test_mypy_finds_nothing() -> None:
    _passes(str(BIN / "mypy"))


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link, a missing page or a page left out of the nav fails the build."""
    _passes(
        str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner about its successor
    )  # fmt: skip
