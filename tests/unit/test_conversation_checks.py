"""Per-conversation checks on a set of bad conversations, one or more per check class: each
finding names its check (the quarantine reason), the file and line or record, and the turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steps.data.conversation_checks import (
    EMPTY_TURN,
    NO_ASSISTANT,
    ROLE_ORDER,
    TOOL_JSON,
    UNKNOWN_ROLE,
    blank,
    check_conversation,
)
from steps.data.conversation_config import ConversationConfig, SharegptTags
from steps.data.conversation_formats import ConversationError, conversation_columns
from steps.data.conversations import Conversation, Turn
from steps.data.local_files import IngestError
from tests.conversation_files import read_file


def _user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str = "hello") -> dict:
    return {"role": "assistant", "content": text}


CALL = {"type": "function", "function": {"name": "f", "arguments": "{oops"}}
# One bad conversation per line of a messages file (line 1 is good): the findings expected
# of it, as (check, turn or column).
MESSAGES_ROWS: list[tuple[dict, list[tuple[str, str | None]]]] = [
    ({"messages": [_user(), _assistant()]}, []),
    ({"messages": [_user(), _assistant(), _assistant()]}, [(ROLE_ORDER, "messages[2]")]),
    ({"messages": [_user(), _assistant(), {"role": "system", "content": "be brief"}, _user(),
                   _assistant()]}, [(ROLE_ORDER, "messages[2]")]),
    ({"messages": [_user(), {"role": "tool", "content": "42"}, _assistant()]},
     [(ROLE_ORDER, "messages[1]")]),
    ({"messages": [_assistant(), _user(), _assistant()]}, [(ROLE_ORDER, "messages[0]")]),
    ({"messages": [_user(" \n\t"), _assistant()]}, [(EMPTY_TURN, "messages[0]")]),
    ({"messages": [_user(), _assistant("\u200b\ufeff")]}, [(EMPTY_TURN, "messages[1]")]),
    ({"messages": [_user(), {"role": "bot", "content": "beep"}]}, [(UNKNOWN_ROLE, "messages[1]")]),
    ({"messages": [{"role": "system", "content": "s"}, _user()]}, [(NO_ASSISTANT, None)]),
    ({"messages": [_user(), {"role": "assistant", "content": None, "tool_calls": [CALL]}]},
     [(TOOL_JSON, "messages[1].tool_calls[0]")]),
    ({"messages": [_user(), _assistant()], "tools": "[{"}, [(TOOL_JSON, "tools")]),
    ({"messages": [_user(), {"role": "assistant",
                             "content": [{"type": "tool_call", "value": "not json"}]}]},
     [(TOOL_JSON, "messages[1].content[0]")]),
]  # fmt: skip


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _found(read) -> list[list[tuple[str, str | None]]]:
    return [[(f.check, f.where) for f in r.findings] for r in read]


def test_each_bad_messages_row_gets_its_findings_naming_line_and_turn(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [record for record, _ in MESSAGES_ROWS])
    read = read_file(path, "messages")
    assert _found(read) == [expected for _, expected in MESSAGES_ROWS]
    for number, row in enumerate(read, start=1):
        assert all(f.place == f"bad.jsonl line {number}" for f in row.findings)
    lines = [f.line() for row in read for f in row.findings]
    assert lines[0] == (
        "bad.jsonl line 2: messages[2]: an assistant turn follows an assistant turn; it must "
        "follow a user or tool turn"
    )
    assert "bad.jsonl line 6: messages[0]: empty user turn (' \\n\\t')" in lines
    assert "bad.jsonl line 9: no assistant turn to learn from (system, user)" in lines
    assert any(
        line.startswith("bad.jsonl line 10: messages[1].tool_calls[0]: tool call 'f': arguments "
                        "are not JSON (Expecting property name")
        for line in lines
    )  # fmt: skip


def test_every_check_class_is_in_the_bad_set():
    checks = {check for _, expected in MESSAGES_ROWS for check, _ in expected}
    assert checks == {ROLE_ORDER, EMPTY_TURN, UNKNOWN_ROLE, NO_ASSISTANT, TOOL_JSON}


def test_an_unknown_role_names_the_role_and_the_settings_that_map_roles(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [MESSAGES_ROWS[7][0]])
    (finding,) = read_file(path, "messages")[0].findings
    assert "'bot'" in finding.detail and "data.conversation.tags" in finding.detail
    sharegpt = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}
    ]
    (tagged,) = read_file(_json(tmp_path / "s.json", sharegpt), "sharegpt")[0].findings
    assert tagged.line() == (
        "s.json record 1: conversations[1]: role tag 'bot' is not one data.conversation.tags "
        "maps (human → user, gpt → assistant, system → system, function_call → assistant, "
        "observation → tool)"
    )


def _json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("get_weather(city='Oslo')", "tool call is not JSON (Expecting value at character 0)"),
        ('{"arguments": {}}', "a tool call without a 'name'"),
        ('{"name": "f"}', "tool call 'f' has no 'arguments'"),
        ("[]", "an empty list of tool calls"),
    ],
)
def test_a_function_call_that_is_not_a_call_is_a_tool_json_finding(tmp_path, value, detail):
    turns = [{"from": "human", "value": "hi"}, {"from": "function_call", "value": value}]
    read = read_file(_json(tmp_path / "s.json", [{"conversations": turns}]), "sharegpt")[0]
    assert read.conversation is None
    (finding,) = read.findings
    assert (finding.check, finding.where) == (TOOL_JSON, "conversations[1]")
    assert finding.detail.startswith(detail)


def test_configured_tags_map_roles_and_a_system_column_opens_the_conversation(tmp_path):
    records = [{"sys": "Be kind.", "dialog": [{"speaker": "me", "text": "hi"},
                                              {"speaker": "bot", "text": "hello"}]}]  # fmt: skip
    tags = SharegptTags(role_tag="speaker", content_tag="text", user_tag="me", assistant_tag="bot")
    config = ConversationConfig(messages_column="dialog", system_column="sys", tags=tags)
    read = read_file(_json(tmp_path / "s.json", records), "sharegpt", config)[0]
    assert read.conversation == Conversation(
        (Turn("system", "Be kind."), Turn("user", "hi"), Turn("assistant", "hello"))
    )
    assert read.turn_names == ("sys", "dialog[0]", "dialog[1]")


def test_a_system_column_and_a_system_turn_is_a_role_order_finding(tmp_path):
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "ok"}]  # fmt: skip
    records = [{"system": "Be kind.", "conversations": turns}]
    read = read_file(_json(tmp_path / "s.json", records), "sharegpt")[0]
    assert [(f.check, f.where) for f in read.findings] == [(ROLE_ORDER, "conversations[0]")]


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"messages": ["hi"]}, "messages",
         "x.jsonl line 1: messages[0] is str 'hi', expected an object"),
        ({"messages": "hi"}, "messages", "x.jsonl line 1: column 'messages' "
         "(data.conversation.messages_column) is str 'hi', expected a list"),
        ({"messages": [{"from": "human", "value": "hi"}]}, "messages",
         "x.jsonl line 1: messages[0] has no 'role' (keys: ['from', 'value']): ShareGPT turns "
         "({from, value}) need data.format sharegpt"),
        ({"conversations": [{"role": "user", "content": "hi"}]}, "sharegpt",
         "x.jsonl line 1: conversations[0] has no 'from' (data.conversation.tags.role_tag; keys: "
         "['role', 'content']): OpenAI turns ({role, content}) need data.format messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "url": "a.png"}]}]},
         "messages", "x.jsonl line 1: messages[0].content[0] is a 'image_url' part: Sift reads "
         "text, reasoning and tool_call parts"),
    ],
)  # fmt: skip
def test_a_row_not_in_the_format_is_an_error_naming_line_turn_and_setting(
    tmp_path, record, fmt, message
):
    with pytest.raises(ConversationError) as error:
        read_file(_write_jsonl(tmp_path / "x.jsonl", [record]), fmt)
    assert str(error.value) == message


def test_a_named_tools_column_that_is_missing_is_an_error_naming_the_setting():
    config = ConversationConfig(tools_column="functions")
    with pytest.raises(IngestError, match=r"data.conversation.tools_column = 'functions' names no"):
        conversation_columns(["messages"], "messages", config, "x.jsonl")


def test_blank_is_true_for_whitespace_control_and_format_characters_only():
    assert all(blank(t) for t in ["", " \t\n", "\u200b\u200d\ufeff", "\x00\x7f", "\u2060\u00ad"])
    assert not any(blank(t) for t in ["a", " .", "\u200bx", "\u3000あ"])


def test_checks_name_canonical_turns_when_no_source_names_are_given():
    conversation = Conversation((Turn("user", "hi"), Turn("tool", "42")))
    found = check_conversation(conversation, "eval row 3")
    assert [f.line() for f in found] == [
        "eval row 3: turns[1]: a tool turn follows a user turn; it must follow an assistant's "
        "tool call or another tool turn",
        "eval row 3: no assistant turn to learn from (user, tool)",
    ]
