"""Conversations through ingest and validation: each bundled format staged in the canonical
schema, data.format auto saying what it read, an ambiguous file refused naming its columns,
and a file with one bad conversation per check quarantined or refused with its line and turn."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from steps.data.conversation_ingest import CONVERSATION_SCHEMA
from steps.data.conversations import conversation_from_json, conversation_id
from steps.data.ingest import SCHEMA, IngestConfig, IngestError, ingest
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, REPO, write_jsonl
from tests.conversation_files import BUNDLED, CONVERSATIONS_DIR, bundled

CHATML = REPO / "assets" / "chat_templates" / "chatml_tools.jinja"
FASTCHAT = CONVERSATIONS_DIR / "fastchat_dummy_conversation_20.json"
runner = CliRunner()


@pytest.mark.parametrize(
    "name", ["reason_tool_use_demo_20.jsonl", "glaive_toolcall_en_demo_20.json"]
)
def test_each_format_stages_the_canonical_conversations_and_says_how_auto_read_it(
    name: str, tmp_path: Path
):
    source = CONVERSATIONS_DIR / name
    config = IngestConfig(source=str(source), eval_source=str(FASTCHAT))
    staged = ingest(config, REPO, tmp_path / "staging")
    table = pd.read_parquet(staged.train.path)
    assert list(table.columns) == CONVERSATION_SCHEMA
    expected = [r.conversation for r in bundled(name)]
    assert [conversation_from_json(text) for text in table.conversation] == expected
    assert list(table.id) == [conversation_id(c) for c in expected if c is not None]
    column = "messages" if BUNDLED[name] == "messages" else "conversations"
    label = f"assets/data/conversations/{name}"  # project-relative, as the data records it
    assert staged.train.staged is not None
    assert staged.train.staged.formats == (
        f"{label}: data.format auto: {BUNDLED[name]} (columns ['{column}'])",
    )
    # FastChat's own ids are kept (data.id_field auto), its roles normalised
    eval_table = pd.read_parquet(staged.eval.path)
    assert eval_table.id[0] == "identity_0"
    roles = {t.role for text in eval_table.conversation for t in conversation_from_json(text).turns}
    assert roles == {"user", "assistant"}


def test_prompt_response_rows_keep_their_schema_and_console(tmp_path: Path):
    """Read as they always were: the same schema, and no line about auto's decision (the
    console stays one line per stage; conversation sources get that line)."""
    staged = ingest(IngestConfig(), REPO, tmp_path / "staging")
    assert list(pd.read_parquet(staged.train.path).columns) == SCHEMA
    assert staged.train.staged is not None
    assert staged.train.staged.formats == ()


def test_a_file_that_fits_two_formats_is_refused_naming_its_columns(tmp_path: Path):
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(
        tmp_path / "both.jsonl", [{"question": "q", "answer": "a", "messages": turns}]
    )
    config = IngestConfig(source=str(path), eval_source=str(path))
    with pytest.raises(IngestError, match="fit more than one format") as error:
        ingest(config, tmp_path, tmp_path / "staging")
    message = str(error.value)
    assert "['question', 'answer', 'messages']" in message and "set data.format" in message


def _chat(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}
# line → (the row, its check, the turn it names)
BAD_ROWS: dict[int, tuple[list[dict], str, str]] = {
    5: (
        [{"role": "assistant", "content": "I open"}, *_chat("ok", "fine")],
        "conversation_role_order",
        "messages[0]: an assistant turn opens the conversation",
    ),
    6: (
        [{"role": "user", "content": " \u200b "}, {"role": "assistant", "content": "a"}],
        "conversation_empty_turn",
        "messages[0]: empty user turn",
    ),
    7: (
        [{"role": "narrator", "content": "once"}, *_chat("go on", "fine")],
        "conversation_unknown_role",
        "messages[0]: role 'narrator' is none of system, user, assistant, tool",
    ),
    8: (
        [{"role": "user", "content": "anyone?"}],
        "conversation_no_assistant",
        "no assistant turn to learn from (user)",
    ),
    9: (
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "conversation_tool_json",
        "messages[1].tool_calls[0]: tool call 'get_weather': arguments are not JSON",
    ),
    10: (
        _chat("word " * 400, "too late"),
        "conversation_too_long",
        "the first assistant turn (turns[1]) ends at token",
    ),
}


def _leaked() -> list[dict]:
    """FastChat's first conversation (the eval split's record 1) as OpenAI messages."""
    record = json.loads(FASTCHAT.read_text())[0]
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def _bad_file(project: Path) -> None:
    """Lines 1-4 good, 5-10 one bad conversation per check, 11 a repeat of line 4 (both are
    duplicates), 12 the eval split's first conversation in another format (leakage)."""
    good = [{"messages": _chat(f"hi {k}", f"hello {k}")} for k in range(4)]
    bad = [{"messages": BAD_ROWS[line][0]} for line in sorted(BAD_ROWS)]
    rows = [*good, *bad, good[3], {"messages": _leaked()}]
    write_jsonl(project / "raw" / "chats.jsonl", rows)


def _validate(project: Path, *extra: str):
    args = ["validate", "--data", "raw/chats.jsonl", "--eval-data", str(FASTCHAT)]
    args += ["--project-dir", str(project), "--set", f"model.name={MODEL_DIR}"]
    args += ["--set", ALLOW_REPO_ASSETS, "--set", f"data.chat_template={CHATML}"]
    args += ["--set", "validation.min_train_rows=4", *extra]
    return runner.invoke(app, args)


def test_every_bad_conversation_is_quarantined_with_its_line_turn_and_check(project: Path):
    _bad_file(project)
    result = _validate(project, "--set", "validation.max_quarantine_fraction=0.7")
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "raw/chats.jsonl: data.format auto: messages (columns ['messages'])" in lines
    assert any(line.startswith("valid: 4 pool and 19 eval rows (9 quarantined)") for line in lines)
    quarantined = pd.read_parquet(project / ".sift" / "validate" / "data" / "quarantine.parquet")
    reasons = list(quarantined.reason)
    out = " ".join(result.output.split())
    for line, (_, check, turn) in BAD_ROWS.items():
        assert f"quarantined [train] raw/chats.jsonl line {line}: {check} (" in out, (line, out)
        assert any(reason.startswith(f"{check} (") and turn in reason for reason in reasons)
    # duplicates and leakage are found on the canonical conversation, whatever its format
    for line in (4, 11):
        assert f"[train] raw/chats.jsonl line {line}: expect_column_values_to_be_unique" in out
    assert (
        "fastchat_dummy_conversation_20.json record 1: expect_column_values_to_not_be_in_set" in out
    )
    accepted = pd.read_parquet(project / ".sift" / "validate" / "data" / "train.parquet")
    firsts = [json.loads(text)["turns"][0]["content"] for text in accepted.conversation]
    assert firsts == ["hi 0", "hi 1", "hi 2", "Who are you?"]


def test_bad_conversations_refused_in_fail_mode_name_line_and_turn_and_touch_no_data(
    project: Path,
):
    _bad_file(project)
    result = _validate(project, "--set", "validation.on_invalid=fail")
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "data validation failed (8 problem(s)); data/ left unchanged" in out
    for line, (_, check, _) in BAD_ROWS.items():
        assert f"column '{check}' (1 rows)" in out and f"raw/chats.jsonl line {line} (" in out
    assert "raw/chats.jsonl line 5 ('messages[0]: an assistant turn opens" in out
    assert not (project / "data").exists() and not (project / "data.dvc").exists()


def test_a_model_without_a_chat_template_needs_data_chat_template(project: Path):
    _bad_file(project)
    args = ["validate", "--data", "raw/chats.jsonl", "--eval-data", str(FASTCHAT)]
    args += ["--project-dir", str(project), "--set", f"model.name={MODEL_DIR}"]
    result = runner.invoke(app, [*args, "--set", ALLOW_REPO_ASSETS])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "its tokenizer has no chat template" in out and "data.chat_template" in out
