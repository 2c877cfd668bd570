"""The local paths a setting names, checked inside data.allowed_roots before anything reads them.

A setting may name a file or a folder; a folder is checked with everything in it (a model
folder's weights, a task folder's YAMLs), since a link inside an allowed folder that points
outside it is the same hole as the setting pointing there itself. steps/paths.py does the
check (tree_inside_roots); flows/config.py check_paths calls it for every setting of a run.
"""

from __future__ import annotations

from pathlib import Path


def named_paths(value: str | None, project_dir: Path, *, working_dir_too: bool) -> list[Path]:
    """The existing local paths a setting's value can name: relative to the project (as
    flows/config.py resolve_paths and ingest read them) and, where the reader is a library
    that opens relative paths from the working directory (transformers, accelerate,
    datasets), relative to that too. None for a hub id or an empty value: nothing to check."""
    if not value:
        return []
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [project_dir / path]
    if working_dir_too and not path.is_absolute():
        candidates.append(path)
    return [candidate for candidate in candidates if candidate.exists()]

