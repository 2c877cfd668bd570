"""Text with nothing visible counts as empty: whitespace-only, control-only or zero-width-only
responses, and prompts whose fields are all blank (whatever their template adds), fail the
suite or are quarantined, each named by file and line. Plain LM data keeps its empty prompts.
So do text that hides characters (bidi overrides, zero-width spaces) and prompts or responses
that are only unfilled template fields ("{question}")."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from steps.data.checks import INVISIBLE
from steps.data.ingest import IngestConfig, ingest
from steps.data.validate import ValidateConfig, quarantine_lines, validate
from steps.modeling import ModelConfig
from tests.conftest import MODEL_DIR, write_jsonl

MODEL = ModelConfig(name=str(MODEL_DIR))
FAIL = ValidateConfig(on_invalid="fail")


def _validate(project: Path, tmp_path: Path, config: ValidateConfig, **data):
    ingest_config = IngestConfig(source="raw/train.jsonl", eval_source="raw/test.jsonl", **data)
    staged = ingest(ingest_config, project, tmp_path / "staging")
    return validate(staged, config, MODEL, tmp_path / "gx", tmp_path / "data")


def _validate_instructions(project: Path, tmp_path: Path, records: list[dict]):
    """Instruction records as the pool, eight held-out ones, prompts "Task: {instruction}\n
    {input}", validated with validation.on_invalid=fail."""
    write_jsonl(project / "raw" / "train.jsonl", records)
    held_out = [
        {"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(8)
    ]
    write_jsonl(project / "raw" / "test.jsonl", held_out)
    template = {"prompt_field": "Task: {instruction}\n{input}", "response_field": "output"}
    return _validate(project, tmp_path, FAIL, **template)


def test_whitespace_only_responses_are_quarantined_with_their_lines(
    project: Path, tmp_path: Path, gsm8k_train
):
    rows = [dict(r) for r in gsm8k_train]
    blank = {3: "   ", 10: "\n\t", 20: " \r\n ", 30: "\u00a0", 40: "\u3000", 50: "\t", 60: "\n"}
    for row, text in blank.items():  # 7 of 80: the 9% of the issue
        rows[row]["answer"] = text
    write_jsonl(project / "raw" / "train.jsonl", rows)
    report = _validate(project, tmp_path, ValidateConfig(max_quarantine_fraction=0.1))
    assert report.success and report.quarantined == 7
    quarantined = pd.read_parquet(tmp_path / "data" / "quarantine.parquet")
    assert list(quarantined.response) == list(blank.values())
    assert set(quarantined.reason) == {"expect_column_values_to_match_regex"}
    assert report.quarantined_rows[0] == (
        "[train] raw/train.jsonl line 4: expect_column_values_to_match_regex"
    )
    assert [note.split(":")[0] for note in report.quarantined_rows] == [
        f"[train] raw/train.jsonl line {row + 1}" for row in blank
    ]

    failed = _validate(project, tmp_path / "fail", FAIL)
    assert not failed.success
    assert (
        "[train] expect_column_values_to_match_regex on column 'response' (7 rows) - response "
        "is only whitespace, control or zero-width characters; raw/train.jsonl line 4 ('   '), "
        "raw/train.jsonl line 11 ('\\n\\t'), raw/train.jsonl line 21 (' \\r\\n ')"
    ) in failed.failures


def test_zero_width_and_control_only_responses_fail_as_blank_and_visible_text_does_not(
    project: Path, tmp_path: Path, gsm8k_train
):
    rows = [dict(r) for r in gsm8k_train]
    rows[2]["answer"] = "\u200b\u200d"  # zero-width space + joiner
    rows[5]["answer"] = "\ufeff"  # a stray byte-order mark
    rows[8]["answer"] = "\x92"  # C1 control: Windows-1252 apostrophe decoded as Latin-1
    rows[9]["answer"] = "6\u200b"  # visible text: not blank (the hidden-character check's)
    write_jsonl(project / "raw" / "train.jsonl", rows)
    report = _validate(project, tmp_path, FAIL)
    visible = next(f for f in report.failures if "values_to_match_regex on column 'res" in f)
    assert visible.startswith("[train] expect_column_values_to_match_regex on column 'response' (3")
    assert "line 3 ('\\u200b\\u200d'), raw/train.jsonl line 6 ('\\ufeff'), " in visible
    assert "raw/train.jsonl line 9 ('\\x92')" in visible
    control = next(f for f in report.failures if "not_match_regex on column 'response'" in f)
    assert "(1 rows); raw/train.jsonl line 9 ('\\x92')" in control  # C1 is a control char too


def test_a_prompt_of_blank_fields_fails_whatever_its_template_adds(project: Path, tmp_path: Path):
    records = [
        {"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(20)
    ]
    records[4] = {"instruction": "", "input": "", "output": "x"}
    records[7] = {"instruction": "  ", "input": "\t", "output": "y"}
    records[9] = {"instruction": "", "input": "3 and 4", "output": "7"}  # input alone: kept
    report = _validate_instructions(project, tmp_path, records)
    (blank,) = [f for f in report.failures if "on column 'prompt'" in f]
    assert blank.startswith(
        "[train] expect_column_values_to_not_match_regex on column 'prompt' (2 rows) - prompt "
        "has no text of its own"
    )
    assert (
        "raw/train.jsonl line 5 ('Task: \\n'), raw/train.jsonl line 8 ('Task:   \\n\\t')" in blank
    )
    assert "[eval]" not in "".join(report.failures)

    plain = {"prompt_field": "instruction", "response_field": "output"}
    report = _validate(project, tmp_path / "plain", FAIL, **plain)
    (blank,) = [f for f in report.failures if "on column 'prompt'" in f]
    assert "(3 rows)" in blank and "line 10 ('')" in blank  # no template: an empty field


def test_hidden_characters_are_named_by_line_and_quoted_where_they_are(
    project: Path, tmp_path: Path, gsm8k_train
):
    rows = [dict(r) for r in gsm8k_train]
    rows[1]["question"] += " \u202eevig ot reward eht\u202c"  # right-to-left override
    rows[4]["question"] = "How\u200b many apples?"  # zero-width space inside a word gap
    rows[6]["answer"] = "x" * 200 + "\u2066#### 0\u2069"  # an isolate, deep in the text
    rows[12]["answer"] = "Pay \ufeff5 dollars"  # a byte-order mark inside text
    rows[20]["question"] = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645?"  # Persian ZWNJ: kept
    rows[21]["answer"] = "\U0001f468\u200d\U0001f469 #### 2"  # an emoji ZWJ sequence: kept
    write_jsonl(project / "raw" / "train.jsonl", rows)
    report = _validate(project, tmp_path, FAIL)
    prompt, response = (
        next(f for f in report.failures if f"column '{column}' (1 rows) - {column} holds cha" in f)
        for column in ("prompt", "response")
    )
    assert prompt.startswith("[train] expect_column_values_to_not_match_regex on column 'prompt'")
    assert "reorder or hide text" in prompt
    assert "; raw/train.jsonl line 2 (" in prompt and "\\u202eevig" in prompt
    assert "raw/train.jsonl line 7 ('…xxxxxxxxxxxxxxxxxxxx\\u2066#### 0\\u2069')" in response
    assert len(report.failures) == 2, report.failures  # zero-width characters only flag

    kept = _validate(project, tmp_path / "quarantine", ValidateConfig(max_quarantine_fraction=0.1))
    assert kept.success and kept.quarantined == 2
    assert [note.split(":")[0] for note in kept.quarantined_rows] == [
        f"[train] raw/train.jsonl line {row}" for row in (2, 7)
    ]
    # Zero-width characters in visible text: kept, and named with their lines.
    flagged_prompt, flagged_response = (
        next(f for f in kept.flagged if f"on column '{column}'" in f)
        for column in ("prompt", "response")
    )
    assert "on column 'prompt' (1 rows) - prompt holds zero-width characters" in flagged_prompt
    assert flagged_prompt.endswith("raw/train.jsonl line 5 ('How\\u200b many apples?')")
    assert flagged_response.endswith("raw/train.jsonl line 13 ('Pay \\ufeff5 dollars')")
    assert not any("line 21" in f or "line 22" in f for f in kept.flagged), kept.flagged
    lines = quarantine_lines(kept)
    assert lines[0].startswith("quarantined [train] raw/train.jsonl line 2: ")
    assert lines[-2:] == [f"flagged {line}" for line in kept.flagged]


def test_prompts_and_responses_of_unfilled_template_fields_fail(project: Path, tmp_path: Path):
    records = [
        {"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(20)
    ]
    records[3] = {"instruction": "{instruction}", "input": "", "output": "x"}
    records[6] = {"instruction": "{{ instruction }}", "input": "${input}", "output": "y"}
    records[8] = {"instruction": "Explain {x} in sets.", "input": "", "output": "z"}  # kept
    records[11] = {"instruction": "Add 1 and 1.", "input": "", "output": "{output}"}
    report = _validate_instructions(project, tmp_path, records)
    (prompt,) = [f for f in report.failures if "on column 'prompt'" in f]
    assert prompt.startswith(
        "[train] expect_column_values_to_not_match_regex on column 'prompt' (2 rows) - prompt "
        "is only unfilled template fields such as '{question}' (beside data.prompt_field's"
    )
    assert (
        "raw/train.jsonl line 4 ('Task: {instruction}\\n'), "
        "raw/train.jsonl line 7 ('Task: {{ instruction }}\\n${input}')" in prompt
    )
    (response,) = [f for f in report.failures if "on column 'response'" in f]
    assert "(1 rows) - response is only an unfilled template field" in response
    assert response.endswith("raw/train.jsonl line 12 ('{output}')")

    plain = {"prompt_field": "instruction", "response_field": "output"}
    report = _validate(project, tmp_path / "plain", FAIL, **plain)
    (prompt,) = [f for f in report.failures if "on column 'prompt'" in f]
    assert "(2 rows)" in prompt and "line 4 ('{instruction}')" in prompt


def test_a_chat_rendered_prompt_of_blank_fields_fails(project: Path, tmp_path: Path, gsm8k_train):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "chat")
    rows = [dict(r) for r in gsm8k_train]
    rows[6]["question"] = " \n "
    write_jsonl(project / "raw" / "train.jsonl", rows)
    report = _validate(project, tmp_path, FAIL, chat_template=str(tmp_path / "chat"))
    (blank,) = [f for f in report.failures if "on column 'prompt'" in f]
    assert (
        "(1 rows)" in blank and "raw/train.jsonl line 7 ('<|user|> \\n \\n<|assistant|>')" in blank
    )


def test_plain_text_data_keeps_its_empty_prompts(project: Path, tmp_path: Path, gsm8k_train):
    lines = [f"{r['question']} {r['answer']}".replace("\n", " ") for r in gsm8k_train]
    (project / "raw" / "train.txt").write_text("\n".join(lines) + "\n")
    staged = ingest(
        IngestConfig(source="raw/train.txt", eval_source="raw/test.jsonl"),
        project,
        tmp_path / "staging",
    )
    assert staged.train.staged is not None and staged.train.staged.empty_prompt is None
    report = validate(staged, FAIL, MODEL, tmp_path / "gx", tmp_path / "data")
    assert report.success, report.failures
    assert set(pd.read_parquet(tmp_path / "data" / "train.parquet").prompt) == {""}


@pytest.mark.parametrize("category", ["Cc", "Cf", "Zs", "Zl", "Zp"])
def test_the_invisible_class_holds_every_control_format_and_space_character(category: str):
    invisible = re.compile(f"[{INVISIBLE}]")
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == category]
    missed = [f"U+{ord(c):04X}" for c in chars if not invisible.match(c)]
    assert chars and not missed


def test_the_invisible_class_holds_no_letter_digit_mark_or_symbol():
    invisible = re.compile(f"[{INVISIBLE}]")
    shown = [
        f"U+{c:04X}"
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c))[0] in "LMNPS" and invisible.match(chr(c))
    ]
    assert shown == []
