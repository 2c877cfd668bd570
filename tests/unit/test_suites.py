"""Benchmark plans (suites, data files, fingerprints, errors) and the promotion gate, no model.

Planning builds every lm-eval task from the bundled 40-row slices (about a second a suite),
so these run with the unit tier; the model-backed checks are tests/model/test_benchmarks.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from steps.evaluation.evaluate import EvalConfig
from steps.evaluation.suites import (
    BenchmarkError,
    BenchmarkPlan,
    builtin_task_path,
    load_tasks,
    metric_keys,
    plan_benchmarks,
)
from steps.registry.gate import (
    GateConfig,
    Measured,
    check_gate_metric,
    decide,
    lower_is_better,
)
from tests.conftest import REPO, write_jsonl

BUNDLED = REPO / "assets" / "eval"
QUICK = ("arc_easy", "arc_challenge", "piqa", "boolq", "lambada_openai", "winogrande")


def _plan(project_dir: Path, **fields) -> BenchmarkPlan:
    return plan_benchmarks(EvalConfig(**fields), project_dir)


@pytest.fixture(scope="module")
def quick_plan(tmp_path_factory) -> BenchmarkPlan:
    return _plan(tmp_path_factory.mktemp("project"))


@pytest.fixture
def eval_copy(tmp_path: Path) -> Path:
    """The bundled slices copied to a folder of the test's own."""
    return Path(shutil.copytree(BUNDLED, tmp_path / "eval_copy"))


# -- plans --------------------------------------------------------------------------------


def test_quick_plan_lists_builtin_tasks_on_bundled_files(quick_plan: BenchmarkPlan):
    assert quick_plan.names == QUICK
    assert quick_plan.suite == "quick"
    for spec in quick_plan.tasks:
        assert spec.source == str(builtin_task_path(spec.name))
        assert len(spec.data_files) == 1
        data_file = Path(spec.data_files[0])
        assert data_file.is_absolute() and data_file.is_file()
        assert data_file.parent == BUNDLED / spec.name
        # the suite overrides the dataset only, with the resolved absolute file
        overrides = json.loads(spec.overrides)
        assert overrides["dataset_path"] == "json"
        assert list(overrides["dataset_kwargs"]["data_files"].values()) == [str(data_file)]


def test_the_real_suite_plans_the_quick_tasks_on_the_500_row_slices(
    quick_plan: BenchmarkPlan, tmp_path: Path
):
    """eval.suite=real with eval.data_dir at its default reads assets/eval/500/; each quick
    slice is the first 40 rows of its 500-row slice."""
    plan = _plan(tmp_path, suite="real")
    assert plan.names == QUICK
    assert metric_keys(plan) == metric_keys(quick_plan)
    for spec, quick in zip(plan.tasks, quick_plan.tasks, strict=True):
        [data_file] = map(Path, spec.data_files)
        assert data_file.parent == BUNDLED / "500" / spec.name
        rows = data_file.read_text().splitlines()
        assert len(rows) == 500
        assert rows[:40] == Path(quick.data_files[0]).read_text().splitlines()
    assert plan.fingerprint != quick_plan.fingerprint


def test_fingerprint_is_stable_across_plans(quick_plan: BenchmarkPlan, tmp_path: Path):
    again = _plan(tmp_path)
    assert again.fingerprint == quick_plan.fingerprint
    assert len(quick_plan.fingerprint) == 32


def test_fingerprint_ignores_where_the_same_files_sit(
    quick_plan: BenchmarkPlan, eval_copy: Path, tmp_path: Path
):
    moved = _plan(tmp_path, data_dir=str(eval_copy))
    assert moved.tasks[0].data_files[0].startswith(str(eval_copy))
    assert moved.fingerprint == quick_plan.fingerprint


def test_fingerprint_changes_with_data_content(
    quick_plan: BenchmarkPlan, eval_copy: Path, tmp_path: Path
):
    data_file = eval_copy / "piqa" / "validation.jsonl"
    lines = data_file.read_text().splitlines(keepends=True)
    edited_row = lines[3].replace('"goal": "', '"goal": "Edited: ', 1)
    assert edited_row != lines[3] and json.loads(edited_row)["goal"].startswith("Edited: ")
    data_file.write_text("".join([*lines[:3], edited_row, *lines[4:]]))
    edited = _plan(tmp_path, data_dir=str(eval_copy))
    assert edited.fingerprint != quick_plan.fingerprint


def test_fingerprint_changes_with_limit(quick_plan: BenchmarkPlan, tmp_path: Path):
    limited = _plan(tmp_path, limit=10)
    assert limited.limit == 10
    assert limited.fingerprint != quick_plan.fingerprint
    assert _plan(tmp_path, limit=11).fingerprint != limited.fingerprint


def test_metric_keys_of_standard_plan(tmp_path: Path):
    keys = metric_keys(_plan(tmp_path, suite="standard"))
    assert {
        "gsm8k/exact_match/flexible-extract",
        "gsm8k/exact_match/strict-match",
        "arc_easy/acc_norm",
        "lambada_openai/perplexity",
    } <= keys


def test_suite_none_plans_nothing(tmp_path: Path):
    plan = _plan(tmp_path, suite="none")
    assert plan.tasks == ()


# -- errors name the setting/task and the file --------------------------------------------


def test_unknown_suite_names_setting_and_path(tmp_path: Path):
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="quik")
    message = str(error.value)
    assert "eval.suite='quik'" in message
    assert str(tmp_path / "quik") in message


def test_suite_member_unknown_task_names_task_and_suite_file(tmp_path: Path):
    suite_path = tmp_path / "mine.yaml"
    suite_path.write_text(
        "group: mine\n"
        "task:\n"
        "  - task: arc_easy\n"
        "    dataset_path: json\n"
        "    dataset_name: null\n"
        "    dataset_kwargs: {data_files: {test: arc_easy/test.jsonl}}\n"
        "    test_split: test\n"
        "  - task: arc_easiest\n"
    )
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="mine.yaml")
    message = str(error.value)
    assert "'arc_easiest'" in message
    assert str(suite_path) in message


def test_missing_data_file_names_task_and_file(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, data_dir=str(empty))
    message = str(error.value)
    assert "task arc_easy" in message
    assert str(empty / "arc_easy" / "test.jsonl") in message
    assert "eval.data_dir" in message


def test_unknown_eval_task_names_setting_and_task(tmp_path: Path):
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="none", tasks=("arc_easiest",))
    assert "eval.tasks" in str(error.value)
    assert "'arc_easiest'" in str(error.value)
    include = tmp_path / "tasks"
    include.mkdir()
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="none", tasks=("arc_easiest",), include_path=str(include))
    assert "'arc_easiest'" in str(error.value)
    assert str(include) in str(error.value)


def test_include_path_yaml_that_does_not_parse_names_file(tmp_path: Path):
    include = tmp_path / "tasks"
    include.mkdir()
    broken = include / "broken.yaml"
    broken.write_text("task: broken\n  dataset_path: json\n dataset_name: null\n")
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="none", include_path="tasks")
    assert "eval.include_path" in str(error.value)
    assert str(broken) in str(error.value)


def test_include_path_function_to_missing_module_names_file(tmp_path: Path):
    include = tmp_path / "tasks"
    include.mkdir()
    task_path = include / "uses_function.yaml"
    task_path.write_text(
        "task: uses_function\n"
        "dataset_path: json\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: !function no_such_module_here.doc_to_text\n"
        "doc_to_choice: ['a', 'b']\n"
        "doc_to_target: 0\n"
    )
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, suite="none", include_path="tasks")
    assert str(task_path) in str(error.value)
    assert "no_such_module_here" in str(error.value)


def test_fewshot_without_train_split_names_task_setting_and_file(tmp_path: Path):
    with pytest.raises(BenchmarkError) as error:
        _plan(tmp_path, num_fewshot=5)
    message = str(error.value)
    assert "eval.num_fewshot=5" in message
    assert "task arc_easy" in message
    assert str(builtin_task_path("arc_easy")) in message


# -- a user's own task --------------------------------------------------------------------


def _write_custom_task(include: Path, data_path: Path) -> Path:
    """A hellaswag-style multiple-choice task: a context, its endings, the right one's index."""
    rows = [
        {"ctx": "Tim found a ball in the park. He", "endings": ["kicked it.", "ate it."],
         "label": 0},
        {"ctx": "Lily was sleepy, so she", "endings": ["ran a race.", "went to bed.", "sang."],
         "label": 1},
        {"ctx": "The cat saw a bird and", "endings": ["jumped.", "read a book."], "label": 0},
    ]  # fmt: skip
    write_jsonl(data_path, rows)
    include.mkdir(parents=True, exist_ok=True)
    task_path = include / "story_endings.yaml"
    task_path.write_text(
        "task: story_endings\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{validation: {data_path}}}}}\n"
        "validation_split: validation\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{ctx}}'\n"
        "doc_to_choice: '{{endings}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata: {version: 1.0}\n"
    )
    return task_path


def test_users_own_task_is_planned_from_include_path(tmp_path: Path):
    include = tmp_path / "tasks"
    task_path = _write_custom_task(include, include / "data" / "validation.jsonl")
    plan = _plan(tmp_path, suite="none", include_path="tasks", tasks=("story_endings",))
    assert plan.names == ("story_endings",)
    assert plan.tasks[0].source == str(task_path)
    assert plan.include_path == str(include)
    assert metric_keys(plan) == {"story_endings/acc"}
    task = load_tasks(plan)["story_endings"]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    arguments = [instance.arguments for instance in task.instances]
    assert arguments == [
        ("Tim found a ball in the park. He", " kicked it."),
        ("Tim found a ball in the park. He", " ate it."),
        ("Lily was sleepy, so she", " ran a race."),
        ("Lily was sleepy, so she", " went to bed."),
        ("Lily was sleepy, so she", " sang."),
    ]
    assert [task.doc_to_target(doc) for doc in task.eval_docs] == [0, 1, 0]


def test_users_task_fingerprint_follows_its_data(tmp_path: Path):
    include = tmp_path / "tasks"
    data_path = include / "data" / "validation.jsonl"
    _write_custom_task(include, data_path)
    config = {"suite": "none", "include_path": "tasks", "tasks": ("story_endings",)}
    before = _plan(tmp_path, **config).fingerprint
    data_path.write_text(data_path.read_text().replace("Tim", "Sam"))
    assert _plan(tmp_path, **config).fingerprint != before


# -- the promotion gate -------------------------------------------------------------------


def test_gate_metric_must_be_a_score_of_the_plan(quick_plan: BenchmarkPlan):
    keys = metric_keys(quick_plan)
    with pytest.raises(ValueError) as error:
        check_gate_metric(GateConfig(metric="arc_easy/f1"), keys)
    assert "registry.gate.metric='arc_easy/f1'" in str(error.value)
    assert "arc_easy/acc" in str(error.value)  # the message lists what is available
    check_gate_metric(GateConfig(metric="arc_easy/acc"), keys)
    check_gate_metric(GateConfig(metric="eval_loss"), keys)
    with pytest.raises(ValueError, match="arc_easy/acc"):
        check_gate_metric(GateConfig(metric="arc_easy/acc"), set())


HIGHER = GateConfig(metric="arc_easy/acc")


def test_decide_promotes_when_gain_beats_margin_and_stderr():
    decision = decide(Measured(0.60, 0.01), Measured(0.50, 0.01), HIGHER, lower=False)
    assert decision.promote
    assert decision.numbers["improvement"] == pytest.approx(0.10)
    assert decision.numbers["combined_stderr"] == pytest.approx(math.hypot(0.01, 0.01))


def test_decide_holds_when_gain_within_margin():
    config = GateConfig(metric="arc_easy/acc", min_margin=0.2)
    decision = decide(Measured(0.60, 0.01), Measured(0.50, 0.01), config, lower=False)
    assert not decision.promote
    assert "margin" in decision.reason


def test_decide_holds_when_gain_within_combined_stderr():
    # gain 0.10 < hypot(0.08, 0.08) = 0.113: noise, not an improvement
    decision = decide(Measured(0.60, 0.08), Measured(0.50, 0.08), HIGHER, lower=False)
    assert not decision.promote
    assert "combined stderr" in decision.reason
    # without a stderr on one side only the margin applies
    assert decide(Measured(0.60, 0.08), Measured(0.50, None), HIGHER, lower=False).promote


def test_decide_never_promotes_a_tie():
    for stderr in (None, 0.0, 0.05):
        for lower in (True, False):
            tie = decide(Measured(0.5, stderr), Measured(0.5, stderr), HIGHER, lower=lower)
            assert not tie.promote
            assert tie.numbers["improvement"] == 0.0


def test_decide_respects_direction():
    loss = GateConfig()  # eval_loss
    better_loss, worse_loss = Measured(1.0), Measured(1.2)
    assert decide(better_loss, worse_loss, loss, lower=True).promote
    assert not decide(better_loss, worse_loss, loss, lower=False).promote
    assert decide(worse_loss, better_loss, loss, lower=False).promote


def test_lower_is_better_by_direction():
    assert lower_is_better(GateConfig(), higher_is_better=None)  # eval_loss auto: lower
    assert lower_is_better(GateConfig(direction="auto"), higher_is_better=True)
    ppl = GateConfig(metric="lambada_openai/perplexity")
    assert lower_is_better(ppl, higher_is_better=False)
    assert not lower_is_better(HIGHER, higher_is_better=True)
    assert lower_is_better(GateConfig(metric="arc_easy/acc", direction="lower"), True)
    assert not lower_is_better(GateConfig(direction="higher"), higher_is_better=None)


def test_decision_numbers_hold_both_values():
    decision = decide(Measured(0.4), Measured(0.7), HIGHER, lower=False)
    assert decision.numbers["arc_easy/acc"] == 0.4
    assert decision.numbers["previous_arc_easy/acc"] == 0.7
    assert decision.numbers["min_margin"] == 0.0
    assert "0.4000" in decision.reason and "0.7000" in decision.reason
