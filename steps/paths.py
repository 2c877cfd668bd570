"""Paths that a config or a data folder names, kept inside the folders allowed to them.

One check for every reader of user-named paths: the path is resolved with every symlink
followed, and must then lie inside one of the allowed roots (themselves resolved). A link
inside an allowed folder that points outside it is caught as the path itself would be.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path


class PathOutsideRoots(ValueError):
    """A path resolving outside the allowed roots; the message names the setting, the path
    and where it leads."""


def resolved_roots(roots: Sequence[str | Path], project_dir: Path) -> list[Path]:
    """The roots as absolute, symlink-free paths; relative ones are relative to project_dir."""
    return [(project_dir / root).resolve() for root in roots]


def inside_roots(
    path: Path,
    roots: Sequence[Path],
    setting: str,
    roots_setting: str = "data.allowed_roots",
) -> Path:
    """`path` resolved (symlinks followed), if that lies inside one of `roots`.

    `roots` must already be resolved (see resolved_roots). Otherwise PathOutsideRoots, one
    line naming `setting`, the path as given and its target, e.g. "data.source 'd/zz.txt'
    resolves to /etc/passwd, outside data.allowed_roots [...]". A symlink loop is refused too.
    """
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise PathOutsideRoots(f"{setting} '{path}' cannot be resolved ({error})") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathOutsideRoots(
            f"{setting} '{path}' resolves to {resolved}, outside {roots_setting} "
            f"{[str(root) for root in roots]}; move the data under the project or add its "
            f"folder to {roots_setting}"
        )
    return resolved


def tree_inside_roots(
    path: Path,
    roots: Sequence[Path],
    setting: str,
    roots_setting: str = "data.allowed_roots",
) -> list[Path]:
    """`path` and, for a folder, every entry under it (hidden ones too; links to folders
    followed once each, loops ended) resolved inside `roots` (see inside_roots): the resolved
    files, in sorted path order (fingerprints hash them in this order). A link inside an
    allowed folder that points outside it is the same hole as the setting pointing there.
    A folder of n entries costs n resolves (~0.3 s for 10k files)."""
    resolved = inside_roots(path, roots, setting, roots_setting)
    if not resolved.is_dir():
        return [resolved]
    files: list[Path] = []
    seen = {resolved}

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            target = inside_roots(entry, roots, setting, roots_setting)
            if not target.is_dir():
                files.append(target)
            elif target not in seen:
                seen.add(target)
                walk(entry)

    walk(path)
    return files


def private_partial(path: Path) -> Path:
    """A name beside path that no other process writes (pid and a random suffix): two
    processes producing the same file or folder at once (two runs of one project embedding
    one pool, converting one GGUF) each write their own, and os.replace / a rename puts a
    whole one in place, never one the other is still writing."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
