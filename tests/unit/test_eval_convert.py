"""The llm-foundry -> lm-eval converter: rows come out in each built-in task's original
schema, and lm-eval's own task machinery, fed the built-in YAML with only the dataset swapped
for the converted file, renders llm-foundry's prompt, choices and gold exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lm_eval
import pytest
from lm_eval.api.task import ConfigurableTask

# lm-eval 0.4.13 has no lm_eval.utils.load_yaml_config; this is the loader its TaskManager
# uses (it resolves `include:` and `!function` entries).
from lm_eval.tasks._yaml_loader import load_yaml

from steps.evaluation.convert import CONVERTERS, SPLITS, convert_all, convert_task, main
from tests.conftest import REPO

BUNDLED_DIR = REPO / "assets" / "eval"
# The "real" suite's 500-row slices of the quick suite's tasks (steps/evaluation/suites/real.yaml).
BUNDLED_500_DIR = BUNDLED_DIR / "500"
TASKS_500 = ["arc_easy", "arc_challenge", "piqa", "boolq", "lambada_openai", "winogrande"]
SHARED_DATA = REPO.parent / "shared" / "data"
BUILTIN_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "winogrande": "winogrande/default.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
FIXTURE_FILES = {
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "openbookqa": "openbook_qa.jsonl",
    "piqa": "piqa.jsonl",
    "boolq": "boolq.jsonl",
    "lambada_openai": "lambada_openai.jsonl",
    "winogrande": "winogrande.jsonl",
    "gsm8k": "test.jsonl",  # the official GSM8K file, in the gsm8k dir
}

# Real rows, copied from ../shared/data/llmfoundry_eval/<file> (line numbers in comments) and
# ../shared/data/gsm8k/test.jsonl.
FIXTURES: dict[str, list[dict[str, Any]]] = {
    "arc_easy": [  # lines 30, 914
        {
            "choices": ["sunlight", "vibrations", "x-rays", "pitch"],
            "query": "Question: What causes sound?",
            "gold": 1,
        },
        {
            "choices": ["lb", "kg", "lb/ft^3", "kg/m^3"],
            "query": "Question: Which is an SI unit for density?",
            "gold": 3,
        },
    ],
    "arc_challenge": [  # lines 554, 576
        {
            "choices": ["Earth.", "the Moon.", "the galaxy.", "the Sun."],
            "query": "Question: Planets orbit",
            "gold": 3,
        },
        {
            "choices": ["1.6", "2.3", "7.0", "11.2"],
            "query": "Question: What is the pH level for pure water?",
            "gold": 2,
        },
    ],
    "openbookqa": [  # lines 3, 59
        {"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2},
        {"query": "Owls are likely to hunt at", "choices": ["3pm", "2am", "6pm", "7am"], "gold": 1},
    ],
    "piqa": [  # lines 1550, 906, 2
        {"choices": ["burns face", "burns air"], "gold": 0, "query": "Question: laser\n"},
        {"choices": ["grips house", "grips spoon"], "gold": 1, "query": "Question: fist\n"},
        {
            "choices": ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"],
            "gold": 1,
            "query": "Question: dresser\n",
        },
    ],
    "boolq": [  # lines 2645, 1828, 2418 (whose passage itself contains "\nQuestion: ")
        {
            "query": "Passage: The season is set for release in 2019.\n"
            "Question: are they going to make a punisher season 2?",
            "choices": ["no", "yes"],
            "gold": 1,
        },
        {
            "query": "Passage: The sixth and final season premiered on 19 August 2018.\n"
            "Question: is a place to call home finished for good?",
            "choices": ["no", "yes"],
            "gold": 0,
        },
        {
            "query": "Passage: Belcher's sea snake, which many times is mistakenly called the "
            "hook-nosed sea snake (Enhydrina schistosa), has been erroneously popularized as the "
            "most venomous snake in the world, due to Ernst and Zug's published book ``Snakes in\n"
            "Question: The Smithsonian Answer Book'' from 1996. Associate Professor Bryan Grieg "
            "Fry, a prominent venom expert, has clarified the error: ``The hook nosed myth was "
            "due to a fundamental error in a book called 'Snakes in\nQuestion'. In there, all "
            "the toxicity testing results were lumped in together, regardless of the mode of "
            "testing (e.g. subcutaneous vs. intramuscular vs intravenous vs intraperitoneal). As "
            "the mode can influence the relative number, venoms can only be compared within a "
            "mode. Otherwise, its apples and rocks.''. Studies on mice and human cardiac cell "
            "culture shows that venom of the inland taipan, drop by drop, is the most toxic "
            "among all snakes; land or sea. The most venomous sea snake is actually Dubois' "
            "seasnake (Aipysurus duboisii ).\nQuestion: is the sea snake the most venomous snake?",
            "choices": ["no", "yes"],
            "gold": 0,
        },
    ],
    "lambada_openai": [  # lines 880, 4463 (a continuation that starts with newlines)
        {
            "context": "“is that a yes yes, or a Nicky yes?”\n“it's a no.”\n“ok. good. so the "
            "plan…?”\n“before all that, we need to go to the florist.”\ni took a few hits of "
            "wine. “we have to go to the",
            "continuation": "florist",
        },
        {
            "context": "“ Would you like anything else…perhaps ice for your eye ?”\n\nHe glanced "
            "up, considering a retort, but simply nodded when \n\nhe saw her sober face.\n\n"
            "While she ordered, he removed a small tape recorder from \n\nhis pocket and set it "
            "on the low table between their \n\nchairs.\n\nShe raised her brows when she "
            "returned and saw the",
            "continuation": "\n\nrecorder",
        },
    ],
    "winogrande": [  # lines 1, 22 (options share "B"), 744 (the blank is followed by "'s")
        {
            "context_options": [
                "Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria",
            ],
            "continuation": "always got the easier cases.",
            "gold": 1,
        },
        {
            "context_options": [
                "Benjamin was chosen instead of Brett to be the makeup artist for the play "
                "because Benjamin",
                "Benjamin was chosen instead of Brett to be the makeup artist for the play "
                "because Brett",
            ],
            "continuation": "was less experienced.",
            "gold": 1,
        },
        {
            "context_options": [
                "Randy was going to see an X-rated film but was stopped on the sidewalk and "
                "yelled at by Nick. The anger showed on Randy",
                "Randy was going to see an X-rated film but was stopped on the sidewalk and "
                "yelled at by Nick. The anger showed on Nick",
            ],
            "continuation": "'s face.",
            "gold": 1,
        },
    ],
    "gsm8k": [  # official test.jsonl line 306
        {
            "question": "John arm wrestles 20 people.  He beats 80%.  How many people did he lose "
            "to?",
            "answer": "He beats 20*.8=<<20*.8=16>>16 people\nSo he loses to 20-16=<<20-16=4>>4 "
            "people\n#### 4",
        },
    ],
}

# What lm-eval must render for each llm-foundry row: (text, choices or None, target).
Expected = tuple[object, object, object]
EXPECTED: dict[str, Callable[[dict[str, Any]], Expected]] = {
    "arc_easy": lambda r: (r["query"] + "\nAnswer:", r["choices"], r["gold"]),
    "arc_challenge": lambda r: (r["query"] + "\nAnswer:", r["choices"], r["gold"]),
    "openbookqa": lambda r: (r["query"], r["choices"], r["gold"]),
    "piqa": lambda r: (r["query"] + "Answer:", r["choices"], r["gold"]),
    "boolq": lambda r: (
        r["query"].removeprefix("Passage: ") + "\nAnswer:",
        r["choices"],
        r["gold"],
    ),
    "lambada_openai": lambda r: (r["context"], None, " " + r["continuation"]),
    "winogrande": lambda r: (r["gold"], r["context_options"], r["continuation"].strip()),
    "gsm8k": lambda r: ("Question: " + r["question"] + "\nAnswer:", None, r["answer"]),
}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _fixture_dirs(tmp_path: Path, task: str, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """(llmfoundry_dir, gsm8k_dir) holding `rows` as the task's source file."""
    llmfoundry_dir, gsm8k_dir = tmp_path / "llmfoundry", tmp_path / "gsm8k"
    _write_jsonl((gsm8k_dir if task == "gsm8k" else llmfoundry_dir) / FIXTURE_FILES[task], rows)
    if task == "gsm8k":
        _write_jsonl(gsm8k_dir / "train.jsonl", rows)
    return llmfoundry_dir, gsm8k_dir


def _builtin_task(task: str, data_dir: Path, cache_dir: Path) -> ConfigurableTask:
    """lm-eval's built-in task with only the dataset swapped, as Sift runs it."""
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAMLS[task])
    files = {split: str(data_dir / task / f"{split}.jsonl") for split in SPLITS[task]}
    config |= {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files, "cache_dir": str(cache_dir)},
    }
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in (None, *files):
            config[key] = None
    return ConfigurableTask(config=config)


def _render(task_obj: ConfigurableTask, doc: dict[str, Any]) -> Expected:
    choices = task_obj.doc_to_choice(doc) if task_obj.config.doc_to_choice else None
    return task_obj.doc_to_text(doc), choices, task_obj.doc_to_target(doc)


def _assert_original_schema(task: str, row: dict[str, Any]) -> None:
    def strings(*columns: str) -> bool:
        return all(isinstance(row[c], str) and row[c] for c in columns)

    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        stem = "question_stem" if task == "openbookqa" else "question"
        assert set(row) == {"id", stem, "choices", "answerKey"} and strings("id", stem)
        assert set(row["choices"]) == {"text", "label"}
        assert len(row["choices"]["text"]) == len(row["choices"]["label"]) >= 2
        assert all(isinstance(t, str) for t in row["choices"]["text"] + row["choices"]["label"])
        assert row["answerKey"] in row["choices"]["label"]
    elif task == "piqa":
        assert set(row) == {"goal", "sol1", "sol2", "label"} and strings("goal", "sol1", "sol2")
        assert type(row["label"]) is int and row["label"] in (0, 1)
    elif task == "boolq":
        assert set(row) == {"passage", "question", "label"} and strings("passage", "question")
        assert type(row["label"]) is int and row["label"] in (0, 1)
        assert not row["question"].endswith("?")  # the built-in prompt adds it
    elif task == "lambada_openai":
        assert set(row) == {"text"} and strings("text") and " " in row["text"]
    elif task == "winogrande":
        assert set(row) == {"sentence", "option1", "option2", "answer"}
        assert strings("sentence", "option1", "option2") and row["sentence"].count("_") == 1
        assert isinstance(row["answer"], str) and row["answer"] in ("1", "2")
    elif task == "gsm8k":
        assert set(row) == {"question", "answer"} and strings("question", "answer")
        assert "#### " in row["answer"]
    else:
        raise AssertionError(f"no schema check for task {task!r}")


def test_every_task_has_a_fixture_and_a_builtin_yaml() -> None:
    assert set(FIXTURES) == set(BUILTIN_YAMLS) == set(EXPECTED) == set(CONVERTERS)


@pytest.mark.parametrize(
    ("task", "folder", "rows"),
    [(task, BUNDLED_DIR, 40) for task in sorted(CONVERTERS)]
    + [(task, BUNDLED_500_DIR, 500) for task in TASKS_500],
)
def test_bundled_rows_have_the_original_schema(task: str, folder: Path, rows: int) -> None:
    for split in SPLITS[task]:
        lines = (folder / task / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == rows, f"{folder}/{task}/{split}.jsonl"
        for number, line in enumerate(lines, start=1):
            try:
                _assert_original_schema(task, json.loads(line))
            except AssertionError as error:
                raise AssertionError(f"{task}/{split}.jsonl:{number}: {line[:200]}") from error


@pytest.mark.parametrize("task", sorted(CONVERTERS))
def test_builtin_yaml_renders_llmfoundry_prompt_from_converted_fixture(
    task: str, tmp_path: Path
) -> None:
    rows = FIXTURES[task]
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, task, rows)
    results = convert_task(task, llmfoundry_dir, gsm8k_dir, tmp_path / "out")
    assert [(r.rows, r.dropped) for r in results] == [(len(rows), 0)] * len(SPLITS[task])
    task_obj = _builtin_task(task, tmp_path / "out", tmp_path / "cache")
    docs = list(task_obj.eval_docs)
    assert len(docs) == len(rows)
    for doc, row in zip(docs, rows, strict=True):
        _assert_original_schema(task, doc)
        assert _render(task_obj, doc) == EXPECTED[task](row)


@pytest.mark.parametrize("task", sorted(CONVERTERS))
def test_builtin_yaml_loads_bundled_slice(task: str, tmp_path: Path) -> None:
    """The bundled files work as lm-eval data: choices are strings, a target indexes them."""
    task_obj = _builtin_task(task, BUNDLED_DIR, tmp_path / "cache")
    for doc in task_obj.eval_docs:
        text, choices, target = _render(task_obj, doc)
        if choices is None:
            assert isinstance(text, str) and isinstance(target, str) and target
        else:
            assert all(isinstance(choice, str) for choice in choices)
            assert isinstance(target, str) or 0 <= target < len(choices)
            assert isinstance(text, str) or 0 <= text < len(choices)  # winogrande: an index


def test_winogrande_options_sharing_leading_letters_stay_whole(tmp_path: Path) -> None:
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, "winogrande", FIXTURES["winogrande"])
    convert_task("winogrande", llmfoundry_dir, gsm8k_dir, tmp_path / "out")
    lines = (tmp_path / "out" / "winogrande" / "validation.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [(d["option1"], d["option2"], d["answer"]) for d in docs] == [
        ("Sarah", "Maria", "2"),
        ("Benjamin", "Brett", "2"),
        ("Randy", "Nick", "2"),
    ]
    assert docs[1]["sentence"].endswith("for the play because _ was less experienced.")
    assert docs[2]["sentence"].endswith("The anger showed on _'s face.")


def test_rows_that_do_not_round_trip_are_dropped_and_counted(tmp_path: Path) -> None:
    no_common_prefix = {
        "context_options": ["Sarah ran", "Maria ran"],
        "continuation": "x",
        "gold": 0,
    }
    two_word_continuation = {"context": "a b", "continuation": "c d"}
    for task, bad in (("winogrande", no_common_prefix), ("lambada_openai", two_word_continuation)):
        rows = [FIXTURES[task][0], bad, FIXTURES[task][1]]
        llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path / task, task, rows)
        [result] = convert_task(task, llmfoundry_dir, gsm8k_dir, tmp_path / "out")
        assert (result.rows, result.dropped) == (2, 1), task


def test_unconvertible_row_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    rows = [FIXTURES["arc_easy"][0], {"choices": ["a", "b"], "query": "What?", "gold": 0}]
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, "arc_easy", rows)
    with pytest.raises(ValueError, match=r"arc_easy\.jsonl:2: .*'Question: '"):
        convert_task("arc_easy", llmfoundry_dir, gsm8k_dir, tmp_path / "out")
    _write_jsonl(llmfoundry_dir / "arc_easy.jsonl", [{"query": "Question: x", "gold": 0}])
    with pytest.raises(ValueError, match=r"arc_easy\.jsonl:1: .*KeyError\('choices'\)"):
        convert_task("arc_easy", llmfoundry_dir, gsm8k_dir, tmp_path / "out")


def test_unknown_task_is_an_error_naming_it_and_the_known_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'hellaswag'.*arc_easy.*winogrande"):
        convert_task("hellaswag", tmp_path, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"'siqa'.*known tasks: arc_easy"):
        convert_all(tmp_path, tmp_path, tmp_path / "out", tasks=["piqa", "siqa"])
    assert not (tmp_path / "out").exists()


def test_limit_keeps_the_first_rows_of_every_split(tmp_path: Path) -> None:
    rows = FIXTURES["piqa"]
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, "piqa", rows)
    [result] = convert_task("piqa", llmfoundry_dir, gsm8k_dir, tmp_path / "out", limit=2)
    goals = [json.loads(line)["goal"] for line in Path(result.path).read_text().splitlines()]
    assert (result.rows, goals) == (2, ["laser", "fist"])
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, "gsm8k", FIXTURES["gsm8k"] * 3)
    results = convert_task("gsm8k", llmfoundry_dir, gsm8k_dir, tmp_path / "out", limit=2)
    assert [(r.split, r.rows) for r in results] == [("test", 2), ("train", 2)]


def test_cli_writes_files_and_sources_and_prints_one_line_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llmfoundry_dir, gsm8k_dir = _fixture_dirs(tmp_path, "boolq", FIXTURES["boolq"])
    _fixture_dirs(tmp_path, "gsm8k", FIXTURES["gsm8k"])
    out_dir = tmp_path / "out"
    main(
        [
            *("--llmfoundry-dir", str(llmfoundry_dir), "--gsm8k-dir", str(gsm8k_dir)),
            *("--out", str(out_dir), "--tasks", "boolq,gsm8k", "--limit", "2"),
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "boolq\tvalidation\t2 rows\t0 dropped",
        "gsm8k\ttest\t1 rows\t0 dropped",
        "gsm8k\ttrain\t1 rows\t0 dropped",
    ]
    sources = (out_dir / "SOURCES.md").read_text()
    assert "`boolq/validation.jsonl` | 2 | 0 |" in sources and "CC BY-SA 3.0" in sources


@pytest.mark.skipif(
    not (SHARED_DATA / "llmfoundry_eval").is_dir(),
    reason="needs ../shared/data (the full llm-foundry and GSM8K files), absent outside dev",
)
def test_bundled_files_equal_a_fresh_conversion_with_limit_40(tmp_path: Path) -> None:
    convert_all(SHARED_DATA / "llmfoundry_eval", SHARED_DATA / "gsm8k", tmp_path, limit=40)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for relative in fresh:
        assert (BUNDLED_DIR / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative
    assert len(fresh) == 1 + sum(len(splits) for splits in SPLITS.values())


@pytest.mark.skipif(
    not (SHARED_DATA / "llmfoundry_eval").is_dir(),
    reason="needs ../shared/data (the full llm-foundry files), absent outside dev",
)
def test_bundled_500_row_files_equal_a_fresh_conversion_with_limit_500(tmp_path: Path) -> None:
    """assets/eval/500/ is exactly what assets/eval/README.md's command writes."""
    convert_all(SHARED_DATA / "llmfoundry_eval", SHARED_DATA / "gsm8k", tmp_path, TASKS_500, 500)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for relative in fresh:
        assert (BUNDLED_500_DIR / relative).read_bytes() == (tmp_path / relative).read_bytes()
    assert len(fresh) == 1 + len(TASKS_500)
