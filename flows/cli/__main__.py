"""python -m flows.cli: `sift` with this checkout's code."""

from flows.cli.main import app

app()
