"""Conversation formats on real files: data.format auto's decision, each row read into the
canonical form against a plain reading of the raw JSON, the JSON and the content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from steps.data.batch import Batch
from steps.data.conversation_config import ConversationConfig, SharegptTags
from steps.data.conversation_formats import (
    ConversationColumns,
    conversation_columns,
    detect_format,
    read_conversation,
    read_conversations,
)
from steps.data.conversations import (
    Conversation,
    ToolCall,
    Turn,
    conversation_from_json,
    conversation_id,
    conversation_json,
)
from steps.data.ingest_config import IngestConfig
from steps.data.local_files import IngestError
from steps.data.readers import iter_local
from tests.conftest import REPO
from tests.conversation_files import BUNDLED, CONVERSATIONS_DIR, bundled, read_file

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "system": "system"}


def _columns(path: Path) -> list[str]:
    return list(next(iter_local(path, [path.parent], "data.source")).frame.columns)


@pytest.mark.parametrize("name", list(BUNDLED))
def test_auto_finds_each_bundled_files_format_and_says_from_which_column(name):
    detected = detect_format(
        _columns(CONVERSATIONS_DIR / name), IngestConfig(), "auto", ConversationConfig(), name
    )
    assert detected.format == BUNDLED[name]
    column = "messages" if BUNDLED[name] == "messages" else "conversations"
    assert detected.message == f"{name}: data.format auto: {BUNDLED[name]} (columns ['{column}'])"


@pytest.mark.parametrize(
    ("source", "data"),
    [
        ("gsm8k/train.jsonl", IngestConfig()),
        (
            "alpaca/train.json",
            IngestConfig(prompt_field="{instruction}\n{input}", response_field="output"),
        ),
        (
            "llamafactory/alpaca_en_demo.json",
            IngestConfig(prompt_field="instruction", response_field="output"),
        ),
    ],
)
def test_auto_keeps_the_bundled_prompt_response_sources_as_they_are_read_today(source, data):
    path = REPO / "assets" / "data" / source
    detected = detect_format(_columns(path), data, "auto", ConversationConfig(), source)
    assert detected.format == "prompt_response"


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        (["messages", "conversations"], ["messages", "conversations"]),
        (["question", "answer", "messages"], ["question", "answer", "messages"]),
    ],
)
def test_auto_refuses_columns_that_fit_two_formats_naming_them(columns, named):
    with pytest.raises(IngestError, match="fit more than one format") as error:
        detect_format(columns, IngestConfig(), "auto", ConversationConfig(), "x.jsonl")
    assert all(f"'{column}'" in str(error.value) for column in named)
    assert "set data.format" in str(error.value)


def test_auto_refuses_columns_that_fit_no_format_naming_them_and_the_settings():
    with pytest.raises(IngestError, match=r"no format fits columns \['chat', 'meta'\]") as error:
        detect_format(["chat", "meta"], IngestConfig(), "auto", ConversationConfig(), "x.jsonl")
    assert "data.prompt_field" in str(error.value)


def test_auto_reads_text_field_and_a_lone_text_column_as_text():
    config = ConversationConfig()
    with_field = IngestConfig(text_field="body")
    assert detect_format(["body", "messages"], with_field, "auto", config, "x").format == "text"
    assert detect_format(["text"], IngestConfig(), "auto", config, "x").format == "text"


def test_a_messages_column_of_your_naming_needs_an_explicit_format():
    config = ConversationConfig(messages_column="dialog")
    with pytest.raises(IngestError, match="data.conversation.messages_column = 'dialog'"):
        detect_format(["dialog"], IngestConfig(), "auto", config, "x")
    assert detect_format(["dialog"], IngestConfig(), "sharegpt", config, "x").format == "sharegpt"


def _raw(name: str) -> list[dict]:
    path = CONVERSATIONS_DIR / name
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def _sharegpt_reference(record: dict) -> Conversation:
    """A plain reading of a ShareGPT record with LLaMA-Factory's default tags."""
    turns = []
    for turn in record["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            turns.append(Turn("assistant", "", (ToolCall(call["name"], arguments),)))
        else:
            turns.append(Turn(SHAREGPT_ROLES[turn["from"]], turn["value"]))  # type: ignore[arg-type]
    tools = json.loads(record.get("tools") or "[]")
    return Conversation(tuple(turns), json.dumps(tools, ensure_ascii=False) if tools else None)


def _messages_reference(record: dict) -> Conversation:
    """A plain reading of a LLaMA-Factory messages record ({type, value} parts)."""
    turns = []
    for message in record["messages"]:
        parts = message["content"]
        text = "".join(p["value"] for p in parts if p["type"] == "text")
        reasoning = [p["value"] for p in parts if p["type"] == "reasoning"]
        calls = []
        for part in (p for p in parts if p["type"] == "tool_call"):
            call = json.loads(part["value"])
            calls.append(ToolCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
        turns.append(Turn(message["role"], text, tuple(calls) or None, "".join(reasoning) or None))
    return Conversation(tuple(turns), json.dumps(json.loads(record["tools"]), ensure_ascii=False))


@pytest.mark.parametrize("name", list(BUNDLED))
def test_every_bundled_row_reads_as_its_plain_reading_with_no_findings(name):
    reference = _messages_reference if BUNDLED[name] == "messages" else _sharegpt_reference
    read = bundled(name)
    assert [r.findings for r in read] == [()] * 20
    assert [r.conversation for r in read] == [reference(record) for record in _raw(name)]


def test_function_calls_become_assistant_tool_calls_and_observations_tool_turns():
    read = bundled("glaive_toolcall_en_demo_20.json")[0]
    assert read.conversation is not None
    call_turn, result_turn = read.conversation.turns[3:5]
    assert call_turn == Turn(
        "assistant",
        "",
        (ToolCall("search_recipes", '{"ingredients": ["chicken", "bell peppers", "rice"]}'),),
    )
    assert result_turn.role == "tool" and result_turn.content.startswith('{"recipes": [')
    assert read.turn_names[3] == "conversations[3]"


def test_the_same_conversation_in_two_formats_has_one_canonical_form_and_id():
    records = _raw("fastchat_dummy_conversation_20.json")
    as_messages = [
        {"messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]}
                      for t in r["conversations"]]}
        for r in records
    ]  # fmt: skip
    sharegpt = [r.conversation for r in bundled("fastchat_dummy_conversation_20.json")]
    frame = pd.DataFrame(as_messages)
    columns = conversation_columns(["messages"], "messages", ConversationConfig(), "m.jsonl")
    batch = Batch(frame, [f"line {i}" for i in range(1, len(frame) + 1)])
    messages = [r.conversation for r in read_conversations(batch, columns, SharegptTags(), "m")]
    assert messages == sharegpt
    assert [conversation_id(c) for c in messages if c] == [
        conversation_id(c) for c in sharegpt if c
    ]


def test_conversation_json_is_pinned_and_reads_back_to_an_equal_value():
    first = bundled("fastchat_dummy_conversation_20.json")[0].conversation
    assert first is not None
    assert conversation_json(first) == (
        '{"turns":[{"role":"user","content":"Who are you?"},{"role":"assistant","content":'
        '"I am Vicuna, a language model trained by researchers from Large Model Systems '
        'Organization (LMSYS)."},{"role":"user","content":"Have a nice day!"},{"role":'
        '"assistant","content":"You too!"}]}'
    )
    assert conversation_id(first) == "51e244441b73d4e0"
    for name in BUNDLED:
        for read in bundled(name):
            assert read.conversation is not None
            text = conversation_json(read.conversation)
            assert "\n" not in text
            assert conversation_from_json(text) == read.conversation


def test_ids_are_equal_exactly_for_equal_conversations_as_glaive_records_5_and_7_are():
    conversations = [r.conversation for name in BUNDLED for r in bundled(name)]
    distinct = {conversation_json(c) for c in conversations if c}
    assert len({conversation_id(c) for c in conversations if c}) == len(distinct) == 59
    glaive = bundled("glaive_toolcall_en_demo_20.json")
    raw = _raw("glaive_toolcall_en_demo_20.json")
    assert raw[4] == raw[6]  # an exact duplicate upstream (records 5 and 7)
    assert glaive[4].conversation is not None and glaive[6].conversation is not None
    assert conversation_id(glaive[4].conversation) == conversation_id(glaive[6].conversation)


def test_tool_call_arguments_hash_the_same_however_their_json_is_spaced_or_nested():
    spaced = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {"a":1}}'},
        ]
    }
    tight = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": '{"name":"f","arguments":"{\\"a\\": 1}"}'},
        ]
    }
    columns = ConversationColumns("sharegpt", "conversations", None, None)
    a, b = (
        read_conversation(r, columns, SharegptTags(), "x").conversation for r in (spaced, tight)
    )
    assert a is not None and b is not None
    assert a.turns[1].tool_calls == (ToolCall("f", '{"a": 1}'),)
    assert conversation_id(a) == conversation_id(b)


def test_a_parquet_copy_reads_as_the_json_file_does(tmp_path):
    name = "reason_tool_use_demo_20.jsonl"
    pd.DataFrame(_raw(name)).to_parquet(tmp_path / "copy.parquet")
    parquet = read_file(tmp_path / "copy.parquet", "messages")
    assert [r.conversation for r in parquet] == [r.conversation for r in bundled(name)]
    assert all(r.findings == () for r in parquet)
