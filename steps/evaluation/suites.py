"""Benchmark suites: which lm-evaluation-harness tasks to run, on which local files.

A suite is an lm-eval group YAML (steps/evaluation/suites/*.yaml, or a user's file) whose
members name built-in tasks and override only their dataset (`dataset_path: json`, local
`data_files` relative to eval.data_dir). Each member becomes lm-eval's own built-in config
merged with that override, so prompts, metrics, filters and task versions are lm-eval's.
eval.include_path adds a folder of the user's own task YAMLs; eval.tasks names tasks in it
(or built-in tasks, whose data then comes from the hub when one is reachable).

Everything is checked here, before any model is loaded: an unknown task, a missing data
file, a YAML that does not parse or resolve, few-shot where the task has no examples for it
(BenchmarkError names the task and the file). Before that, at the edge of a run, every local
file the eval section leads lm-eval to read is kept inside data.allowed_roots
(steps/evaluation/task_paths.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from steps import config_files
from steps.hashing import file_md5, text_md5

SUITES_DIR = Path(__file__).parent / "suites"
NAMED_SUITES = ("quick", "standard", "real")
REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchmarkError(ValueError):
    """A benchmark setting, task or data file at fault; raised before any model is loaded."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # the YAML that defines the task: lm-eval's built-in or the user's
    overrides: str  # JSON of the suite's overrides (dataset only), "{}" for none
    data_files: tuple[str, ...]  # absolute local files the task reads


@dataclass(frozen=True)
class BenchmarkPlan:
    """What a benchmark run evaluates; `fingerprint` covers the task YAMLs, their data,
    lm-eval's version, limit and few-shot: equal fingerprints are comparable scores."""

    suite: str
    tasks: tuple[TaskSpec, ...]
    include_path: str | None
    limit: int | None
    num_fewshot: int | None
    fingerprint: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def builtin_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


@cache
def _builtin_candidates() -> dict[str, tuple[Path, ...]]:
    """Built-in task name → YAMLs whose text declares it, by a text scan (~0.3 s) instead of
    lm-eval's full index (~6 s)."""
    found: dict[str, list[Path]] = {}
    pattern = re.compile(r"^task:\s*['\"]?([^\s'\"#]+)", re.M)
    for path in sorted(builtin_tasks_dir().rglob("*.yaml"), key=lambda p: p.as_posix()):
        match = pattern.search(path.read_text(errors="replace"))
        if match is not None:
            found.setdefault(match.group(1), []).append(path)
    return {name: tuple(paths) for name, paths in found.items()}


def builtin_task_path(name: str) -> Path | None:
    """The built-in YAML lm-eval's own index would pick for `name` (first in path order
    whose parsed `task:` is the name), or None."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in _builtin_candidates().get(name, ()):
        with contextlib.suppress(Exception):
            if load_yaml(path, resolve_func=False).get("task") == name:
                return path
    return None


def resolve_data_dir(data_dir: str, project_dir: Path) -> Path:
    """Relative to the project, else to the Sift checkout (the bundled slices)."""
    path = Path(data_dir).expanduser()
    if path.is_absolute():
        return path
    for root in (project_dir, REPO_ROOT):
        if (root / path).is_dir():
            return (root / path).resolve()
    return (project_dir / path).resolve()


def suite_file(suite: str, project_dir: Path) -> Path | None:
    if suite == "none":
        return None
    if suite in NAMED_SUITES:
        return SUITES_DIR / f"{suite}.yaml"
    path = Path(suite).expanduser()
    path = path if path.is_absolute() else project_dir / path
    if not path.is_file():
        raise BenchmarkError(
            f"eval.suite={suite!r}: not one of none|{'|'.join(NAMED_SUITES)} and no such file "
            f"({path})"
        )
    return path


def _suite_members(path: Path) -> list[dict[str, Any]]:
    try:
        parsed = config_files.read_yaml(path, "eval.suite")
    except config_files.YamlFileError as error:
        raise BenchmarkError(str(error)) from None
    members = parsed.get("task") if isinstance(parsed, dict) else None
    if not isinstance(members, list) or not members:
        raise BenchmarkError(f"eval.suite {path}: needs a `task:` list of lm-eval tasks")
    normalised = []
    for member in members:
        entry = {"task": member} if isinstance(member, str) else member
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
            raise BenchmarkError(f"eval.suite {path}: member {member!r} has no task name")
        normalised.append(entry)
    return normalised


def _local_files(task: str, overrides: dict[str, Any], data_dir: Path, source: Path) -> list[str]:
    """Resolves the override's data_files against data_dir (in place) and checks they exist."""
    files = (overrides.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    as_dict = files if isinstance(files, dict) else {"test": files}
    resolved = {}
    for split, name in as_dict.items():
        path = Path(name) if Path(name).is_absolute() else data_dir / name
        if not path.is_file():
            raise BenchmarkError(
                f"task {task} ({source}): data file for split {split!r} not found: {path} "
                "(eval.data_dir sets where data_files are looked up)"
            )
        resolved[split] = str(path)
    overrides["dataset_kwargs"] = {**overrides["dataset_kwargs"], "data_files": resolved}
    return sorted(resolved.values())


def _user_tasks(include_path: Path) -> dict[str, Path]:
    """Task name → YAML in the user's folder; a YAML that does not load is an error naming
    it (lm-eval itself would skip it and later say only "Tasks not found")."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not include_path.is_dir():
        raise BenchmarkError(f"eval.include_path={include_path}: no such folder")
    tasks: dict[str, Path] = {}
    for path in sorted(include_path.rglob("*.yaml")):
        try:
            parsed = load_yaml(path, resolve_func=True)
        except Exception as error:
            raise BenchmarkError(
                f"eval.include_path: {path} does not load: {type(error).__name__}: {error}"
            ) from None
        if isinstance(parsed.get("task"), str):
            tasks[parsed["task"]] = path
    return tasks


def plan_benchmarks(config: Any, project_dir: Path) -> BenchmarkPlan:
    """The tasks eval.suite + eval.tasks name, resolved and checked (config: EvalConfig)."""
    data_dir = resolve_data_dir(config.data_dir, project_dir)
    include = Path(config.include_path).expanduser() if config.include_path else None
    if include is not None and not include.is_absolute():
        include = (project_dir / include).resolve()
    user = _user_tasks(include) if include is not None else {}
    specs: list[TaskSpec] = []
    suite = suite_file(config.suite, project_dir)
    members = _suite_members(suite) if suite is not None else []
    for member in members:
        assert suite is not None
        name, overrides = member["task"], {k: v for k, v in member.items() if k != "task"}
        source = user.get(name) or builtin_task_path(name)
        if source is None:
            raise BenchmarkError(f"eval.suite {suite}: task {name!r} is not an lm-eval task")
        files = _local_files(name, overrides, data_dir, suite)
        specs.append(TaskSpec(name, str(source), json.dumps(overrides, sort_keys=True),
                              tuple(files)))  # fmt: skip
    for name in config.tasks:
        if name in {s.name for s in specs}:
            continue
        source = user.get(name) or builtin_task_path(name)
        if source is None:
            where = f" or in eval.include_path={include}" if include else ""
            raise BenchmarkError(f"eval.tasks: {name!r} is not a built-in lm-eval task{where}")
        specs.append(TaskSpec(name, str(source), "{}", ()))
    plan = BenchmarkPlan(
        suite=config.suite,
        tasks=tuple(specs),
        include_path=str(include) if include else None,
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        fingerprint=_fingerprint(specs, config.limit, config.num_fewshot, include),
    )
    if specs:
        # Builds every task (reads its data): a broken one fails here. The tasks built are
        # kept for this process's first run of the plan instead of being built twice.
        _unused_tasks[plan] = load_tasks(plan)
    return plan


def _fingerprint(
    specs: list[TaskSpec], limit: int | None, fewshot: int | None, include: Path | None
) -> str:
    parts: list[str] = [version("lm_eval"), repr(limit), repr(fewshot)]
    for spec in specs:
        yaml_dir = Path(spec.source).parent  # the YAML, what it includes, its !function code
        code = [file_md5(p) for p in sorted(yaml_dir.glob("*")) if p.suffix in {".yaml", ".py"}]
        # data by content, not by path: the same files elsewhere give comparable scores
        overrides = json.loads(spec.overrides)
        files = (overrides.get("dataset_kwargs") or {}).get("data_files") or {}
        for split, path in files.items():
            files[split] = file_md5(Path(path))
        parts += [spec.name, json.dumps(overrides, sort_keys=True), *code]
    if include is not None:
        parts += [file_md5(p) for p in sorted(include.rglob("*")) if p.is_file()]
    return text_md5("\n".join(parts))


def task_configs(plan: BenchmarkPlan) -> list[dict[str, Any]]:
    """Each task's full config: its YAML (includes and !function resolved) + the overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for spec in plan.tasks:
        merged = {**load_yaml(spec.source, resolve_func=True), **json.loads(spec.overrides)}
        metadata = merged.get("metadata")
        merged["metadata"] = {**(metadata if isinstance(metadata, dict) else {}),
                              "sift_task_yaml": spec.source}  # fmt: skip
        configs.append(merged)
    return configs


def metric_keys(plan: BenchmarkPlan) -> set[str]:
    """task/metric (task/metric/filter under a filter) of every score the plan will yield."""
    keys = set()
    for spec, task_config in zip(plan.tasks, task_configs(plan), strict=True):
        metrics = [m["metric"] for m in task_config.get("metric_list") or []]
        filters = [f["name"] for f in task_config.get("filter_list") or []]
        for metric in metrics:
            keys |= {f"{spec.name}/{metric}" + (f"/{f}" if f != "none" else "")
                     for f in filters or ["none"]}  # fmt: skip
    return keys


def task_manager(plan: BenchmarkPlan) -> Any:
    """Only the user's folder is indexed: indexing lm-eval's ~14k built-in YAMLs costs ~10 s
    and built-in tasks are found by builtin_task_path instead."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=plan.include_path, include_defaults=False)


_unused_tasks: dict[BenchmarkPlan, dict[str, Any]] = {}


def tasks_to_run(plan: BenchmarkPlan) -> dict[str, Any]:
    """Fresh tasks for one evaluation: those plan_benchmarks built to check the plan, if this
    process has not used them yet (lm-eval sets few-shot seeds on a task as it runs), else
    built again."""
    return _unused_tasks.pop(plan, None) or load_tasks(plan)


def load_tasks(plan: BenchmarkPlan) -> dict[str, Any]:
    """name → lm-eval Task, data loaded; a task that fails to build names itself and why."""
    manager = task_manager(plan)
    tasks: dict[str, Any] = {}
    for spec, task_config in zip(plan.tasks, task_configs(plan), strict=True):
        try:
            with quiet_harness():
                loaded = manager.load([task_config])["tasks"]
        except Exception as error:
            raise BenchmarkError(
                f"task {spec.name} ({spec.source}): does not build: "
                f"{type(error).__name__}: {error}"
            ) from None
        for name, task in loaded.items():
            _check_fewshot(name, task, plan.num_fewshot, spec.source)
            tasks[name] = task
    return tasks


def _check_fewshot(name: str, task: Any, num_fewshot: int | None, source: str) -> None:
    shots = task.config.num_fewshot if num_fewshot is None else num_fewshot
    if not shots:
        return
    fewshot_split = task.config.fewshot_split
    has_examples = (fewshot_split and fewshot_split in task.dataset) or task.has_training_docs()
    if not has_examples:
        raise BenchmarkError(
            f"eval.num_fewshot={shots}: task {name} ({source}) has no training or few-shot "
            "split in its data; set eval.num_fewshot=0 or add a train file to its data_files"
        )


@contextlib.contextmanager
def quiet_harness() -> Iterator[None]:
    """lm-eval logs every dataset build at INFO/WARNING; keep the console to Sift's lines."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
