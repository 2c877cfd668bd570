"""Every local path a setting names stays inside data.allowed_roots, symlinks followed, and
config files are read only where they were named and under a size and alias limit.

Each escape is a link inside the project to a file or folder outside it; check_paths must
refuse it naming the setting, the link and its target before anything reads the target.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.config import ConfigError, check_paths, load_config, resolve_paths
from steps.config_files import MAX_CONFIG_BYTES, MAX_YAML_NODES
from steps.data.ingest import IngestError
from steps.evaluation.evaluate import EvalConfig
from steps.evaluation.suites import BenchmarkError, plan_benchmarks
from steps.paths import PathOutsideRoots
from steps.study.study import load_study_config
from tests.conftest import MODEL_DIR

SECRET = "aws_secret_access_key = do-not-print-me\n"
TASK = "task: escape_task\ndataset_path: json\noutput_type: multiple_choice\n"


@pytest.fixture
def layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """project/ (the config's project and the working directory, as for a worker's run) and
    outside/: a secret, a model folder, a task YAML, task code and a data file, none of
    which a setting may reach."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    monkeypatch.chdir(project)  # relative model.name etc. are also read from here
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text("{}")
    (outside / "task.yaml").write_text(TASK)
    (outside / "evil.py").write_text("def fn(docs):\n    return docs\n")
    (outside / "data.jsonl").write_text('{"x": 1}\n')
    return project, outside


def _link(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _task_folder(project: Path, text: str) -> str:
    (project / "tasks").mkdir(exist_ok=True)
    (project / "tasks" / "mine.yaml").write_text(text)
    return "eval.include_path=tasks"


def _suite_climbing_out(project: Path) -> Path:
    """A suite whose member names a data file two folders above eval.data_dir (ev/)."""
    (project / "ev").mkdir()
    (project / "suite.yaml").write_text(
        "task:\n  - task: arc_easy\n    dataset_path: json\n"
        "    dataset_kwargs: {data_files: {test: ../../outside/data.jsonl}}\n"
    )
    return project / "ev" / ".." / ".." / "outside" / "data.jsonl"


def _module(path: Path) -> str:
    """A !function reference that lm-eval turns into `path` (.py): dots become slashes."""
    assert "." not in str(path.with_suffix(""))
    return str(path.with_suffix("")).replace("/", ".") + ".fn"


# (case id, the setting named in the message, builds the escape: (project, outside) ->
# (the --set items, the link or file named in the message, its target outside))
Case = Callable[[Path, Path], tuple[list[str], Path, Path]]
CASES: list[tuple[str, str, Case]] = [
    (
        "model folder is a link",
        "model.name",
        lambda p, o: (["model.name=models/m"], _link(p / "models" / "m", o / "model"), o / "model"),
    ),
    (
        "a file in the model folder is a link",
        "model.name",
        lambda p, o: (
            ["model.name=models/m"],
            _link(p / "models" / "m" / "model.safetensors", o / "secret.txt"),
            o / "secret.txt",
        ),
    ),
    (
        "chat template tokenizer file is a link",
        "data.chat_template",
        lambda p, o: (
            ["data.chat_template=tok"],
            _link(p / "tok" / "tokenizer.json", o / "secret.txt"),
            o / "secret.txt",
        ),
    ),
    (
        "pool file is a link",
        "data.source",
        lambda p, o: (
            ["data.source=d/train.jsonl"],
            _link(p / "d" / "train.jsonl", o / "data.jsonl"),
            o / "data.jsonl",
        ),
    ),
    (
        "a file in the eval folder is a link",
        "data.eval_source",
        lambda p, o: (
            ["data.eval_source=d"],
            _link(p / "d" / "zz.jsonl", o / "data.jsonl"),
            o / "data.jsonl",
        ),
    ),
    (
        "select.target is a link",
        "select.target",
        lambda p, o: (
            ["select.selector=fisher-target", "select.target=prompts.jsonl"],
            _link(p / "prompts.jsonl", o / "secret.txt"),
            o / "secret.txt",
        ),
    ),
    (
        "accelerate config is a link",
        "finetune.accelerate_config",
        lambda p, o: (
            ["finetune.accelerate_config=acc.yaml", "finetune.num_processes=2"],
            _link(p / "acc.yaml", o / "secret.txt"),
            o / "secret.txt",
        ),
    ),
    (
        "suite file is a link",
        "eval.suite",
        lambda p, o: (
            ["eval.suite=suite.yaml"],
            _link(p / "suite.yaml", o / "task.yaml"),
            o / "task.yaml",
        ),
    ),
    (
        "eval.data_dir is a link",
        "eval.data_dir",
        lambda p, o: (["eval.data_dir=ev"], _link(p / "ev", o), o),
    ),
    (
        "a suite member's data file climbs out of eval.data_dir",
        "dataset_kwargs.data_files",
        lambda p, o: (
            ["eval.suite=suite.yaml", "eval.data_dir=ev"],
            _suite_climbing_out(p),
            o / "data.jsonl",
        ),
    ),
    (
        "include_path is a link",
        "eval.include_path",
        lambda p, o: (["eval.include_path=tasks"], _link(p / "tasks", o), o),
    ),
    (
        "a task YAML in include_path is a link",
        "eval.include_path",
        lambda p, o: (
            ["eval.include_path=tasks"],
            _link(p / "tasks" / "t.yaml", o / "task.yaml"),
            o / "task.yaml",
        ),
    ),
    (
        "a task YAML includes a YAML outside",
        "include",
        lambda p, o: (
            [_task_folder(p, f"include: {o / 'task.yaml'}\ntask: mine\n")],
            o / "task.yaml",
            o / "task.yaml",
        ),
    ),
    (
        "a task's !function imports code outside",
        "!function",
        lambda p, o: (
            [_task_folder(p, f"{TASK}process_docs: !function {_module(o / 'evil.py')}\n")],
            o / "evil.py",
            o / "evil.py",
        ),
    ),
    (
        "a task's data file lies outside",
        "dataset_kwargs.data_files",
        lambda p, o: (
            [
                _task_folder(
                    p, f"{TASK}dataset_kwargs: {{data_files: {{test: {o / 'data.jsonl'}}}}}\n"
                )
            ],
            o / "data.jsonl",
            o / "data.jsonl",
        ),
    ),
]


@pytest.mark.parametrize(("setting", "escape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_setting_that_leads_outside_the_roots_is_refused_naming_setting_link_and_target(
    layout, setting: str, escape: Case
):
    project, outside = layout
    overrides, link, target = escape(project, outside)
    config = resolve_paths(load_config(None, overrides), project)
    with pytest.raises(ValueError) as refused:  # IngestError for the data sources
        check_paths(config, project)
    message = str(refused.value)
    assert setting in message and str(link) in message, message
    assert str(target.resolve()) in message and "data.allowed_roots" in message, message
    assert SECRET.strip() not in message


def test_study_results_dir_that_is_a_link_out_is_refused(layout):
    project, outside = layout
    link = _link(project / "results", outside)
    config = load_study_config(None, [("study.results_dir", "results")], project)
    with pytest.raises(PathOutsideRoots, match="study.results_dir") as refused:
        check_paths(config, project)
    assert str(link) in str(refused.value) and str(outside) in str(refused.value)


def test_hub_ids_links_inside_the_roots_and_added_roots_pass(layout):
    project, outside = layout
    _link(project / "assets" / "m", project / "models" / "real")  # a link inside: fine
    (project / "models" / "real").mkdir(parents=True)
    (project / "models" / "real" / "config.json").write_text("{}")
    hub = ["model.name=HuggingFaceTB/SmolLM2-135M", "data.source=openai/gsm8k"]
    check_paths(resolve_paths(load_config(None, hub), project), project)
    check_paths(resolve_paths(load_config(None, ["model.name=assets/m"]), project), project)
    _link(project / "models" / "out", outside / "model")
    added = ["model.name=models/out", f"data.allowed_roots={json.dumps(['.', str(outside)])}"]
    check_paths(resolve_paths(load_config(None, added), project), project)


def test_a_path_typed_as_a_commands_own_option_is_its_users_choice(layout):
    project, outside = layout
    config = load_config(None, [f"data.source={outside / 'data.jsonl'}"])
    check_paths(config, project, skip=("data.source",))  # `sift select --data`
    with pytest.raises(IngestError, match="data.source"):
        check_paths(config, project)


def test_the_repos_own_configs_and_assets_pass():
    """Every path the bundled configs name is in the clone, but for a model that `make
    smollm2` fetches into models/ (not in git): until fetched, its setting is left out."""
    repo = MODEL_DIR.parents[2]
    for path in sorted((repo / "configs").glob("*.yaml")):
        if path.name.startswith("study"):
            check_paths(load_study_config(path, [], repo), repo)
            continue
        config = resolve_paths(load_config(path), repo)
        model = repo / config.model.name
        unfetched = model.is_relative_to(repo / "models") and not model.exists()
        check_paths(config, repo, skip={"model.name"} if unfetched else ())


# -- config files ----------------------------------------------------------------------


def test_a_config_linked_out_of_the_project_is_refused_unread(layout):
    project, outside = layout
    link = _link(project / "configs" / "run.yaml", outside / "secret.txt")
    with pytest.raises(ConfigError) as refused:
        load_config(link)  # the project: the working directory
    message = str(refused.value)
    assert "--config" in message and str(link) in message
    assert str((outside / "secret.txt").resolve()) in message and SECRET.strip() not in message


def test_a_config_named_outside_or_linked_within_its_folder_is_read(layout):
    _, outside = layout
    (outside / "run.yaml").write_text("select:\n  budget: 7\n")
    assert load_config(outside / "run.yaml").select.budget == 7  # named outside: on purpose
    data = outside / "configmap" / "..data"  # a Kubernetes ConfigMap mount: links in its folder
    data.mkdir(parents=True)
    (data / "run.yaml").write_text("select:\n  budget: 8\n")
    mounted = _link(outside / "configmap" / "run.yaml", data / "run.yaml")
    assert load_config(mounted).select.budget == 8
    leaving = _link(outside / "configmap" / "leaving.yaml", outside / "run.yaml")
    with pytest.raises(ConfigError, match="outside the folder it is named in"):
        load_config(leaving)


def test_a_config_over_the_size_limit_is_refused_before_parsing(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text("select: [" + "1, " * (MAX_CONFIG_BYTES // 3) + "\n")  # unclosed: invalid
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"larger than 256 KiB.*not parsed"):
        load_config(path)
    assert time.perf_counter() - started < 1


def _laughs(levels: int = 9) -> list[str]:
    """Each level a list of ten aliases of the one before: 10^levels nodes once expanded."""
    first = "&l0 [" + ", ".join(["lol"] * 10) + "]"
    return [first] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]


BILLION_LAUGHS = "".join(f"k{i}: {level}\n" for i, level in enumerate(_laughs()))


@pytest.mark.parametrize(
    "text",
    [BILLION_LAUGHS, "data: &r {allowed_roots: [*r]}\n"],
    ids=["billion laughs", "recursive"],
)
def test_a_config_whose_aliases_expand_too_far_is_refused_before_it_is_built(
    tmp_path: Path, text: str
):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"over the limit of {MAX_YAML_NODES:,}"):
        load_config(path)
    with pytest.raises(ConfigError, match="--set eval.tasks"):
        load_config(None, ["eval.tasks=[" + ", ".join(_laughs()) + "]"])
    assert time.perf_counter() - started < 1


def test_a_config_that_is_not_yaml_is_one_line_naming_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("select:\n  budget: 0.2\n   selector: [unclosed\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(path) in str(refused.value) and "line 3" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_suite_or_task_yaml_over_the_limits_is_refused(layout):
    project, _ = layout
    (project / "suite.yaml").write_text("task: [" + "arc_easy, " * (MAX_CONFIG_BYTES // 9) + "]\n")
    with pytest.raises(BenchmarkError, match="eval.suite .*larger than 256 KiB"):
        plan_benchmarks(EvalConfig(suite="suite.yaml"), project)
    overrides = [_task_folder(project, BILLION_LAUGHS), "eval.suite=none"]
    with pytest.raises(BenchmarkError, match="eval.include_path .*mine.yaml: its aliases"):
        check_paths(resolve_paths(load_config(None, overrides), project), project)
