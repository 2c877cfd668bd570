"""Content hashes that key caches and folders: of files, and of the code a step runs.

A cache key must cover everything that changes a result. For code, that is the source of
the module a step lives in plus every `steps` module it imports, directly or not, and no
more: an edit to the registry code must not throw away embeddings.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path


def file_md5(path: Path) -> str:
    """md5 of a file's bytes, read in chunks (the same digest DVC records per file)."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def code_fingerprint(*modules: str) -> str:
    """md5 over the source of `modules` and of every `steps` module they import.

    Imports are read from the source (ast), function-level ones too, so the key follows the
    code as it is on disk now; a module outside `steps` (torch, transformers) is pinned by
    the lock file and recorded as library versions, not hashed here.
    """
    closure: set[str] = set()
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        closure.add(name)
        pending.extend(_imported_steps_modules(_source_path(name)))
    digest = hashlib.md5()
    for name in sorted(closure):
        digest.update(f"{name}\n".encode())
        digest.update(_source_path(name).read_bytes())
    return digest.hexdigest()


STEPS_DIR = Path(__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    """steps.a.b → steps/a/b.py or steps/a/b/__init__.py, found on disk without importing."""
    parts = module.split(".")
    if parts[0] != "steps":
        return None
    base = STEPS_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _source_path(module: str) -> Path:
    path = _module_file(module)
    if path is None:
        raise ValueError(f"code_fingerprint: {module!r} is not a module of the steps package")
    return path


def _imported_steps_modules(path: Path) -> list[str]:
    """The `steps` modules (and the packages above them) that one file imports."""
    return list(_imports_of(path, path.stat().st_mtime_ns))


@cache
def _imports_of(path: Path, _mtime_ns: int) -> tuple[str, ...]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from steps.selection import pool` names a module; `from steps.x import f` a
            # function in one: keep whichever resolves to a module.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
            found.update(prefix for prefix in prefixes if _module_file(prefix) is not None)
    return tuple(sorted(found))
