"""Typed configs from defaults, a YAML file and dotted overrides (shared by every flow's config).

Each flow's config is a pydantic model whose defaults live in the step modules; a YAML file
and `--set section.key=value` overrides only replace values. Unknown keys and wrong types
are errors naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def parse_override(text: str) -> tuple[str, Any]:
    """'select.budget=0.2' -> ('select.budget', 0.2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value, e.g. select.budget=0.2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def load_model(
    model: type[Model],
    path: Path | None,
    overrides: list[tuple[str, Any]],
    error: type[ValueError],
    what: str = "config",
) -> Model:
    """Defaults, then the YAML file, then the overrides; every problem raised as `error`."""
    tree: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise error(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise error(f"{path}: top level must be a mapping of sections")
        tree = loaded
    try:
        for dotted, value in overrides:
            set_dotted(tree, dotted, value)
    except ValueError as problem:
        raise error(str(problem)) from None
    try:
        return model.model_validate(tree)
    except ValidationError as invalid:
        problems = "\n  ".join(
            # a check across sections (a model validator) has no key to lead with
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in invalid.errors()
        )
        source = f" in {path}" if path else ""
        raise error(f"invalid {what}{source}:\n  {problems}") from None
