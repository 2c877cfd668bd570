"""Every local file the eval section leads lm-eval to read, kept inside data.allowed_roots.

eval.suite's file and the data files its members name (relative to eval.data_dir), and
eval.include_path with everything in it, plus what its task YAMLs reach beyond it: the
YAMLs they `include:`, the Python files their `!function` tags import (lm-eval turns
`!function ..x.fn` into a path of its own), and the data their `dataset_path` and
`dataset_kwargs` name (opened by `datasets` from the working directory). Each is checked
before it is parsed or read; each YAML passes steps/config_files.py's size and alias limits.
What is otherwise wrong with a YAML (syntax, shape) is left to suites.plan_benchmarks, which
names the task and file.
Sift's own suites (quick, standard, real) and lm-eval's built-in tasks are code, not settings;
eval.data_dir falling back to the Sift checkout's bundled slices (suites.resolve_data_dir)
is allowed as that folder, and data files named from it must stay inside it or the roots.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from steps import config_files
from steps.evaluation.suites import NAMED_SUITES, REPO_ROOT, SUITES_DIR, BenchmarkError
from steps.paths import inside_roots, tree_inside_roots
from steps.setting_paths import named_paths


def check_benchmark_paths(config: Any, project_dir: Path, roots: Sequence[Path]) -> None:
    """PathOutsideRoots (naming the setting, the link and its target) for the first local
    file of eval.suite, eval.data_dir or eval.include_path (config: EvalConfig) that lies
    outside `roots` (resolved data.allowed_roots); BenchmarkError for a YAML that is too
    large, expands too far or does not parse."""
    data_dir, data_roots = _data_dir(config.data_dir, project_dir, roots)
    for suite in _suite_files(config.suite, project_dir, roots):
        parsed = _parsed(suite, "eval.suite", yaml.SafeLoader)
        members = parsed.get("task") if isinstance(parsed, dict) else None
        for member in members if isinstance(members, list) else []:
            if isinstance(member, dict):
                setting = f"eval.suite {suite} task {member.get('task')}"
                _check_dataset(member, data_dir, data_roots, setting)
    for include in named_paths(config.include_path, project_dir, working_dir_too=False):
        tree_inside_roots(include, roots, "eval.include_path")
        seen: set[Path] = set()
        for task_yaml in sorted(include.rglob("*.yaml")):  # the YAMLs suites._user_tasks loads
            _check_task_yaml(task_yaml, roots, "eval.include_path", seen)


def _suite_files(suite: str, project_dir: Path, roots: Sequence[Path]) -> list[Path]:
    """eval.suite's file, checked unless it is one of Sift's own (code, not a setting):
    their members' data files, under eval.data_dir, are checked all the same."""
    if suite in NAMED_SUITES:
        return [SUITES_DIR / f"{suite}.yaml"]
    paths = named_paths(suite, project_dir, working_dir_too=False) if suite != "none" else []
    for path in paths:
        inside_roots(path, roots, "eval.suite")
    return paths


def _data_dir(data_dir: str, project_dir: Path, roots: Sequence[Path]) -> tuple[Path, list[Path]]:
    """eval.data_dir as suites.resolve_data_dir finds it, checked, and the roots its data
    files may lie in: the allowed roots, plus the bundled folder when it is the fallback."""
    path = Path(data_dir).expanduser()
    if not path.is_absolute() and not (project_dir / path).is_dir():
        bundled = REPO_ROOT / path
        if bundled.is_dir():  # the Sift checkout's own slices: part of the code
            return bundled, [*roots, bundled.resolve()]
    named = path if path.is_absolute() else project_dir / path
    if named.exists():
        inside_roots(named, roots, "eval.data_dir")
    return named, list(roots)


def _check_task_yaml(path: Path, roots: Sequence[Path], setting: str, seen: set[Path]) -> None:
    """One task YAML, what it includes, the code its !function tags import and its data."""
    resolved = inside_roots(path, roots, setting)
    if resolved in seen:  # an include cycle: lm-eval refuses it, with its own message
        return
    seen.add(resolved)
    task = _parsed(path, setting, _TaskLoader)
    if not isinstance(task, dict):
        return  # suites.plan_benchmarks names a YAML that is no mapping
    base = resolved.parent  # lm-eval resolves includes and !function from the YAML's target
    includes = task.get("include")
    for include in includes if isinstance(includes, list) else [includes]:
        if isinstance(include, str):
            _check_task_yaml(base / include, roots, f"{setting} ({path} include)", seen)
    for function in _functions(task):
        module = function.rpartition(".")[0]
        code = base / f"{module.replace('.', '/')}.py"  # as lm-eval's _import_func_in_yml
        if code.exists():
            inside_roots(code, roots, f"{setting} ({path} !function {function})")
    _check_dataset(task, Path.cwd(), roots, f"{setting} ({path})")


def _parsed(path: Path, setting: str, loader: type[yaml.SafeLoader]) -> Any:
    """A YAML's data; BenchmarkError when it is over a size or alias limit, None when it is
    otherwise unreadable (suites.plan_benchmarks then names the file and the problem)."""
    try:
        return config_files.read_yaml(path, setting, loader)
    except config_files.YamlLimitError as error:
        raise BenchmarkError(str(error)) from None
    except config_files.YamlFileError:
        return None


def _check_dataset(task: dict[str, Any], base: Path, roots: Sequence[Path], setting: str) -> None:
    """The local data a task's dataset keys name: dataset_path (a folder `datasets` loads),
    and dataset_kwargs' data_files and data_dir, relative to `base` (eval.data_dir for a
    suite's members, the working directory for a user's task) or to a local dataset_path."""
    bases = [base]
    dataset_path = task.get("dataset_path")
    if isinstance(dataset_path, str):
        for path in named_paths(dataset_path, base, working_dir_too=True):
            tree_inside_roots(path, roots, f"{setting} dataset_path")
            bases.append(path)
    kwargs = task.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return
    for key in ("data_files", "data_dir"):
        for name in _strings(kwargs.get(key)):
            for folder in bases:
                for path in _matches(folder / Path(name).expanduser()):
                    tree_inside_roots(path, roots, f"{setting} dataset_kwargs.{key}")


def _matches(path: Path) -> list[Path]:
    """The files a data_files entry names: itself, or what its glob pattern matches."""
    if glob.has_magic(str(path)):
        return [Path(match) for match in glob.glob(str(path), recursive=True)]
    return [path] if path.exists() else []


def _strings(value: Any) -> Iterator[str]:
    """Every string in a data_files value: a string, a list, or a split -> either mapping."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


class _Function(str):
    """A `!function module.name` reference, kept as text (never imported here)."""


def _functions(value: Any) -> Iterator[str]:
    if isinstance(value, _Function):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _functions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _functions(item)


class _TaskLoader(yaml.SafeLoader):
    """Safe loading that knows lm-eval's !function tag and leaves any other tag's value
    plain: the check must read every YAML lm-eval accepts, and import none of its code."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> _Function:
    return _Function(loader.construct_scalar(node))  # type: ignore[arg-type]


_TaskLoader.add_constructor("!function", _function)
_TaskLoader.add_constructor(None, _plain)
