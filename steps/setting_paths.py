"""The local paths a setting names, checked inside data.allowed_roots before anything reads them.

A setting may name a file or a folder; a folder is checked with everything in it (a model
folder's weights, a task folder's YAMLs), since a link inside an allowed folder that points
outside it is the same hole as the setting pointing there itself. steps/paths.py does the
check of one path; flows/config.py check_paths calls this for every setting of a run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from steps.paths import inside_roots


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


def check_tree(path: Path, roots: Sequence[Path], setting: str) -> Path:
    """`path` resolved inside `roots`, and, for a folder, every entry under it (links to
    folders followed once each, loops ended): PathOutsideRoots names the setting, the entry
    and its target. A folder of n entries costs n resolves (~0.3 s for 10k files)."""
    resolved = inside_roots(path, roots, setting)
    if not resolved.is_dir():
        return resolved
    seen, folders = {resolved}, [path]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                target = inside_roots(Path(entry.path), roots, setting)
                if target.is_dir() and target not in seen:
                    seen.add(target)
                    folders.append(Path(entry.path))
    return resolved
