"""Convert llm-foundry's eval files back to the column schemas of lm-eval's built-in tasks.

Sift runs lm-eval's own task YAMLs with only the dataset swapped for a local JSON file, so
each row needs the columns the YAML's doc_to_text/choice/target read. llm-foundry's copies
of the official splits (mosaicml/llm-foundry scripts/eval/local_data) hold the rendered
prompt; each converter inverts it, renders the built-in template logic in plain Python and
raises when prompt, choices or gold differ from llm-foundry's (LAMBADA and WinoGrande rows
that do not round-trip are dropped and counted instead).

Synthesised, as llm-foundry's files lack them: ARC/OpenBookQA `id` ("<file>:<line>") and
`choices.label` (A, B, ...; some original ARC rows use 1-4, but the built-in target is an
index into the labels, so the same answer is scored), and the whitespace after
WinoGrande's "_" (the built-in target strips it).

Left out: SIQA and CommonsenseQA (llm-foundry's copy dropped an answer option: 2 of
SIQA's 3, 4 of CommonsenseQA's 5), COPA (premise punctuation lost, choices lower-cased,
and the built-in prompt has no comma before the connective) and WSC273 (the built-in
task reads pronoun and position columns the copy does not keep).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# (llm-foundry row, row id "<file>:<line>") -> original-schema row, or None to drop the row.
Converter = Callable[[Row, str], Row | None]


@dataclass(frozen=True)
class Converted:
    task: str
    split: str
    path: str
    rows: int
    dropped: int


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"query does not start with {prefix!r}: {text[:80]!r}")
    return text[len(prefix) :]


def _check(rendered: object, expected: object, what: str) -> None:
    if rendered != expected:
        raise ValueError(f"built-in {what} {rendered!r} != llm-foundry's {expected!r}")


def _multiple_choice(row: Row, row_id: str, stem_column: str, stem: str) -> Row:
    """ARC and OpenBookQA: {id, <stem_column>, choices: {text, label}, answerKey}."""
    choices, gold = row["choices"], row["gold"]
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold!r} is not an index into {len(choices)} choices")
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    doc: Row = {"id": row_id, stem_column: stem}
    doc |= {"choices": {"text": list(choices), "label": labels}, "answerKey": labels[gold]}
    # both YAMLs: "{{choices.text}}", "{{choices.label.index(answerKey)}}" (OBQA: .lstrip())
    _check(doc["choices"]["text"], choices, "choices")
    _check(doc["choices"]["label"].index(doc["answerKey"].lstrip()), gold, "target")
    return doc


def _convert_arc(row: Row, row_id: str) -> Row:
    """{query: "Question: X", choices, gold} -> {id, question: X, choices, answerKey}."""
    doc = _multiple_choice(row, row_id, "question", _strip_prefix(row["query"], "Question: "))
    # arc_easy.yaml doc_to_text: "Question: {{question}}\nAnswer:"
    _check("Question: " + doc["question"] + "\nAnswer:", row["query"] + "\nAnswer:", "text")
    return doc


def _convert_openbookqa(row: Row, row_id: str) -> Row:
    """{query, choices, gold} -> {id, question_stem: query, choices, answerKey}.

    llm-foundry's query is the bare question stem, as openbookqa.yaml's doc_to_text is.
    """
    return _multiple_choice(row, row_id, "question_stem", row["query"])


def _convert_piqa(row: Row, row_id: str) -> Row:
    """{query: "Question: goal\\n", choices: [sol1, sol2], gold} -> {goal, sol1, sol2, label}."""
    if len(row["choices"]) != 2 or row["gold"] not in (0, 1):
        raise ValueError(f"expected 2 choices and gold 0/1, got {row!r}"[:200])
    query, (sol1, sol2) = row["query"], row["choices"]
    if not query.endswith("\n"):
        raise ValueError(f"query does not end with a newline: {query[-40:]!r}")
    goal = _strip_prefix(query, "Question: ")[:-1]
    doc: Row = {"goal": goal, "sol1": sol1, "sol2": sol2, "label": row["gold"]}
    # piqa.yaml: "Question: {{goal}}\nAnswer:", {{[sol1, sol2]}}, label
    _check("Question: " + doc["goal"] + "\nAnswer:", query + "Answer:", "text")
    _check([doc["sol1"], doc["sol2"]], row["choices"], "choices")
    return doc


def _convert_boolq(row: Row, row_id: str) -> Row:
    """{query: "Passage: P\\nQuestion: Q?", choices: [no, yes], gold} -> {passage, question, label}.

    The original question has no "?" (llm-foundry appended one, as the built-in prompt does);
    split at the last "\\nQuestion: " as a few passages contain that text themselves.
    """
    _check(row["choices"], ["no", "yes"], "choices")
    if row["gold"] not in (0, 1):
        raise ValueError(f"gold {row['gold']!r} is not 0/1")
    body = _strip_prefix(row["query"], "Passage: ")
    passage, separator, question = body.rpartition("\nQuestion: ")
    if not separator or not question.endswith("?") or "\n" in question:
        raise ValueError(f"query does not end with '\\nQuestion: <one line>?': {body[-80:]!r}")
    doc: Row = {"passage": passage, "question": question[:-1], "label": row["gold"]}
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:"
    _check(passage + "\nQuestion: " + doc["question"] + "?\nAnswer:", body + "\nAnswer:", "text")
    return doc


def _convert_lambada(row: Row, row_id: str) -> Row | None:
    """{context, continuation} -> {text}; None when the built-in split would not give both back."""
    text = row["context"] + " " + row["continuation"]
    # lambada_openai.yaml: text.split(' ')[:-1]|join(' ') and ' '+text.split(' ')[-1]
    words = text.split(" ")
    if " ".join(words[:-1]) != row["context"] or words[-1] != row["continuation"]:
        return None
    return {"text": text}


_NO_SPACE_AFTER_BLANK = ("'", ".", ",", ";", ":", "!", "?")


def _convert_winogrande(row: Row, row_id: str) -> Row | None:
    """{context_options: [a, b], continuation, gold} -> {sentence, option1, option2, answer}.

    The text before "_" is the options' common prefix cut back to a word boundary, so options
    sharing leading letters ("Sarah"/"Sam") stay whole. None when it does not round-trip.
    """
    first, second = row["context_options"]
    common = os.path.commonprefix([first, second])  # noqa: RUF071 (characters, not paths)
    prefix = common[: max(common.rfind(" "), common.rfind("\n")) + 1]
    continuation = row["continuation"].strip()
    if row["gold"] not in (0, 1):
        raise ValueError(f"gold {row['gold']!r} is not 0/1")
    gap = "" if continuation.startswith(_NO_SPACE_AFTER_BLANK) else " "  # "_'s", "_."
    option1, option2 = first[len(prefix) :], second[len(prefix) :]
    sentence = prefix + "_" + gap + continuation
    doc: Row = {"sentence": sentence, "option1": option1, "option2": option2}
    doc["answer"] = str(row["gold"] + 1)
    # winogrande/preprocess_winogrande.py: doc_to_choice / doc_to_target / doc_to_text
    blank = doc["sentence"].index("_")
    choices = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    target = doc["sentence"][blank + 1 :].strip()
    index = {"1": 0, "2": 1}[doc["answer"]]
    exact = choices == [first, second] and target == continuation and index == row["gold"]
    return doc if exact and prefix and option1 and option2 and continuation else None


def _convert_gsm8k(row: Row, row_id: str) -> Row:
    """Official GSM8K rows are already the original schema: checked, then copied unchanged."""
    if set(row) != {"question", "answer"} or "#### " not in row["answer"]:
        raise ValueError(f"not an official GSM8K row {{question, answer}}: {row!r}"[:200])
    return row


CONVERTERS: dict[str, Converter] = {
    "arc_easy": _convert_arc,
    "arc_challenge": _convert_arc,
    "openbookqa": _convert_openbookqa,
    "piqa": _convert_piqa,
    "boolq": _convert_boolq,
    "lambada_openai": _convert_lambada,
    "winogrande": _convert_winogrande,
    "gsm8k": _convert_gsm8k,
}
# gsm8k reads the official `<split>.jsonl` files from gsm8k_dir, the rest llmfoundry_dir.
SOURCE_FILES: dict[str, str] = {task: f"{task}.jsonl" for task in CONVERTERS} | {
    "openbookqa": "openbook_qa.jsonl",
    "gsm8k": "{split}.jsonl",
}
# The original split each file is (PIQA, BoolQ and WinoGrande test labels are not public).
SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(["arc_easy", "arc_challenge", "openbookqa", "lambada_openai"], ("test",)),
    **dict.fromkeys(["piqa", "boolq", "winogrande"], ("validation",)),
    "gsm8k": ("test", "train"),
}
# From each dataset's own card or repository: EVAL_GAUNTLET.md names the benchmarks, no licences.
LICENCES: dict[str, str] = {
    **dict.fromkeys(["arc_easy", "arc_challenge"], "AI2 ARC (allenai/ai2_arc): CC BY-SA 4.0"),
    "openbookqa": "OpenBookQA (allenai/openbookqa): not stated on its dataset card (`unknown`)",
    "piqa": "PIQA (ybisk/piqa): not stated on its dataset card (`unknown`)",
    "boolq": "BoolQ (google/boolq, SuperGLUE): CC BY-SA 3.0",
    "lambada_openai": "LAMBADA (EleutherAI/lambada_openai): card says MIT; original CC BY 4.0",
    "winogrande": "WinoGrande (allenai/winogrande, winogrande_xl dev): CC-BY",
    "gsm8k": "GSM8K (openai/grade-school-math): MIT",
}


def _source_path(task: str, split: str, llmfoundry_dir: Path, gsm8k_dir: Path) -> Path:
    base = gsm8k_dir if task == "gsm8k" else llmfoundry_dir
    return base / SOURCE_FILES[task].format(split=split)


def _write_jsonl(path: Path, rows: list[Row]) -> Path:
    """Write to a sibling temp file and rename, so a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return partial.replace(path)


def _convert_line(task: str, source: Path, line_number: int, line: str) -> Row | None:
    try:
        return CONVERTERS[task](json.loads(line), f"{source.name}:{line_number}")
    except (KeyError, TypeError, ValueError) as error:
        message = f"{source}:{line_number}: cannot convert to the {task} schema: {error!r}"
        raise ValueError(message) from error


def convert_task(
    task: str, llmfoundry_dir: Path, gsm8k_dir: Path, out_dir: Path, limit: int | None = None
) -> list[Converted]:
    """Write `out_dir/<task>/<original split>.jsonl` per split from the first `limit` rows.

    Reads `llmfoundry_dir/SOURCE_FILES[task]`, or for gsm8k `gsm8k_dir/<split>.jsonl`.
    Dropped rows count against `limit`, so a slice is always source lines 1..limit.
    """
    if task not in CONVERTERS:
        raise ValueError(f"unknown eval task {task!r}; known tasks: {', '.join(CONVERTERS)}")
    written = []
    for split in SPLITS[task]:
        source = _source_path(task, split, Path(llmfoundry_dir), Path(gsm8k_dir))
        with source.open() as handle:
            lines = itertools.islice(enumerate(handle, start=1), limit)
            docs = [_convert_line(task, source, number, line) for number, line in lines]
        rows = [doc for doc in docs if doc is not None]
        path = _write_jsonl(Path(out_dir) / task / f"{split}.jsonl", rows)
        written.append(Converted(task, split, str(path), len(rows), len(docs) - len(rows)))
    return written


_SOURCES_HEADER = """# Sources of these eval files

Written by `python -m steps.evaluation.convert`: lm-eval's original column schemas, from
mosaicml/llm-foundry's scripts/eval/local_data (repository licence Apache-2.0) and the
official GSM8K files (openai/grade-school-math). Licences are the upstream datasets' own.

| file | rows | dropped | source | dataset licence |
|---|---|---|---|---|"""


def _sources_markdown(results: list[Converted], llmfoundry_dir: Path, gsm8k_dir: Path) -> str:
    lines = [_SOURCES_HEADER]
    for result in results:
        source = _source_path(result.task, result.split, llmfoundry_dir, gsm8k_dir)
        lines.append(
            f"| `{result.task}/{result.split}.jsonl` | {result.rows} | {result.dropped} "
            f"| `{source.parent.name}/{source.name}` | {LICENCES[result.task]} |"
        )
    return "\n".join(lines) + "\n"


def convert_all(
    llmfoundry_dir: Path,
    gsm8k_dir: Path,
    out_dir: Path,
    tasks: list[str] | None = None,
    limit: int | None = None,
) -> list[Converted]:
    """Convert every task (or `tasks`) and write `out_dir/SOURCES.md` describing the files."""
    unknown = [task for task in tasks or [] if task not in CONVERTERS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; known tasks: {', '.join(CONVERTERS)}")
    results: list[Converted] = []
    for task in tasks or list(CONVERTERS):
        results += convert_task(task, llmfoundry_dir, gsm8k_dir, out_dir, limit=limit)
    sources = _sources_markdown(results, Path(llmfoundry_dir), Path(gsm8k_dir))
    (Path(out_dir) / "SOURCES.md").write_text(sources)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--llmfoundry-dir", type=Path, required=True)
    parser.add_argument("--gsm8k-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="keep the first N rows per file")
    parser.add_argument("--tasks", help=f"comma-separated, of: {','.join(CONVERTERS)}")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    for result in convert_all(args.llmfoundry_dir, args.gsm8k_dir, args.out, tasks, args.limit):
        print(f"{result.task}\t{result.split}\t{result.rows} rows\t{result.dropped} dropped")


if __name__ == "__main__":
    main()
