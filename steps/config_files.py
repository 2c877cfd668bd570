"""Typed configs from defaults, a YAML file and dotted overrides (shared by every flow's config).

Each flow's config is a pydantic model whose defaults live in the step modules; a YAML file
and `--set section.key=value` overrides only replace values. Unknown keys and wrong types
are errors naming the key.

Every YAML Sift reads from a path a user names (a config file, a benchmark suite, a task in
eval.include_path) goes through `read_yaml`: a file above MAX_CONFIG_BYTES is refused before
it is parsed, and one whose aliases would expand past MAX_YAML_NODES ("billion laughs")
before it is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from steps.paths import PathOutsideRoots

Model = TypeVar("Model", bound=BaseModel)

# The largest committed config is 2.3 KB (configs/, prefect.yaml) and lm-eval's largest task
# YAML 61 KB; PyYAML (pure Python, as safe_load) takes ~0.7 s on 256 KiB of config-like YAML
# here, 3.6 s on 1 MiB, and took 88 s and 970 MB on 10 MB (issue 22). 256 KiB keeps 4x the
# largest real YAML and bounds a parse under a second.
MAX_CONFIG_BYTES = 256 * 1024
# A node is a scalar, list or mapping, counted at every alias that repeats it. The largest
# committed config has 135 (prefect.yaml); 256 KiB of plain YAML holds at most ~130k ("1,"
# per node), so aliases may not make a document larger than a file at the size limit could
# be, while the classic billion laughs (9 levels of 10 aliases) expands to 10^9.
MAX_YAML_NODES = 100_000


class YamlFileError(ValueError):
    """A YAML file that cannot be read: missing, not text, not valid YAML, or over a limit."""


class YamlLimitError(YamlFileError):
    """A YAML file above MAX_CONFIG_BYTES or whose aliases expand past MAX_YAML_NODES."""


def read_yaml(path: Path, what: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """A YAML file's data, read with `loader` (SafeLoader, or a subclass that knows more
    tags). Refused, naming `what` and the file, when it is no regular file, is above
    MAX_CONFIG_BYTES (checked by reading at most that many bytes: a FIFO or a file that grows
    cannot get past it) or its aliases expand past MAX_YAML_NODES; a syntax error names the line."""
    if not path.is_file():  # /dev/zero or a FIFO is no regular file: never read
        raise YamlFileError(f"{what} {path}: not found or not a regular file")
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise YamlLimitError(
            f"{what} {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, the limit for a YAML "
            "file Sift reads (steps/config_files.py MAX_CONFIG_BYTES); not parsed"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        where = f"{error.reason} at byte {error.start}"
        raise YamlFileError(f"{what} {path}: not UTF-8 text ({where})") from None
    return parse_yaml(text, f"{what} {path}", loader)


def parse_yaml(text: str, where: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """yaml.safe_load with the alias check between composing and building the document."""
    parser = loader(text)
    try:
        node = parser.get_single_node()
        if node is None:
            return None
        nodes = expanded_nodes(node)
        if nodes > MAX_YAML_NODES:
            raise YamlLimitError(
                f"{where}: its aliases expand it to {nodes:,} nodes, over the limit of "
                f"{MAX_YAML_NODES:,} (steps/config_files.py MAX_YAML_NODES); not built"
            )
        return parser.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise YamlFileError(f"{where}{at}: not valid YAML: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise YamlFileError(f"{where}: not valid YAML: {error}") from None
    except RecursionError:
        raise YamlLimitError(f"{where}: nested too deeply to parse") from None
    finally:
        parser.dispose()


def expanded_nodes(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is replaced by what it names.

    Linear in the composed graph (an alias is the same node object again, so each node's
    count is computed once); an alias inside its own anchor (a recursive document) counts
    as unbounded."""
    counts: dict[int, int] = {}
    pending: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in counts:
            return counts[key]
        if key in pending:
            return MAX_YAML_NODES + 1  # a document that contains itself never ends
        pending.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(count(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(count(k) + count(v) for k, v in node.value)
        else:
            total = 1
        pending.discard(key)
        counts[key] = total
        return total

    return count(root)


def check_config_location(path: Path, project_dir: Path, setting: str = "--config") -> Path:
    """The config file resolved (symlinks followed), if it leads where it could have been
    named: a file named inside the project must resolve inside the project; one named
    elsewhere (`--config /tmp/x.yaml` is a deliberate choice) inside the folder it is named
    in (a Kubernetes ConfigMap's links stay inside their mount). A link that leaves them
    (configs/x.yaml -> /etc/shadow) is refused naming the setting, the link and its target."""
    named = Path(os.path.abspath(path))  # `..` folded, links not followed: what was typed
    project = Path(os.path.abspath(project_dir))
    inside_project = named.is_relative_to(project)
    allowed = project.resolve() if inside_project else named.parent.resolve()
    resolved = named.resolve()
    if not resolved.is_relative_to(allowed):
        where = "the project" if inside_project else "the folder it is named in"
        raise PathOutsideRoots(
            f"{setting} '{path}' resolves to {resolved}, outside {where} ({allowed}); "
            "name the file itself"
        )
    return resolved


def parse_override(text: str) -> tuple[str, Any]:
    """'select.budget=0.2' -> ('select.budget', 0.2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value, e.g. select.budget=0.2")
    return key.strip(), parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""


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
    project_dir: Path | None = None,
) -> Model:
    """Defaults, then the YAML file, then the overrides; every problem raised as `error`.

    The file must lead where it is named (check_config_location; project_dir defaults to
    the working directory) and pass read_yaml's size and alias limits."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            if path.exists() or path.is_symlink():
                check_config_location(path, project_dir or Path.cwd())
            loaded = read_yaml(path, f"{what} file", yaml.SafeLoader) or {}
        except (YamlFileError, PathOutsideRoots) as problem:
            raise error(str(problem)) from None
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
