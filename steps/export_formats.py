"""Export formats: selected rows as the records of a trainer's format, and the entry that
tells LLaMA-Factory how to read them (steps/export.py writes them).

messages (TRL's conversational format, https://huggingface.co/docs/trl/dataset_formats):
{"messages": [{role, content}, ...]}, string contents; "tools" as JSON text (TRL's
SFTTrainer parses a string), an assistant's tool calls as OpenAI's {"type": "function",
"function": {name, arguments}} with the arguments as JSON text (one Arrow type whatever
the tool), its reasoning as "reasoning_content". sharegpt and alpaca (LLaMA-Factory's
data/README.md): {"conversations": [{from, value}, ...]} and {instruction, input, output},
each with a "system" and a "tools" column where any row has one. LLaMA-Factory reads
sharegpt turns in pairs (a user or observation turn, then an assistant or function_call
turn) and skips a row of any other shape with a warning, so here such a row is an error
naming it: the trainer would not see the selection.

A conversation source's rows go out as read when the export's format is the source's and
the record is already in that format's shape (keep_source_records); otherwise every row is
written from its canonical Conversation (steps/data/conversations.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from steps.data.conversation_config import SharegptTags
from steps.data.conversation_formats import ConversationColumns
from steps.data.conversations import Conversation, ToolCall, Turn, json_text

ExportFormat = Literal["messages", "sharegpt", "alpaca"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
# LLaMA-Factory's column names of an alpaca file (its dataset_info.json `columns`).
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


class ExportError(ValueError):
    """A selection, row or setting the export cannot write; the message names it."""


@dataclass(frozen=True)
class SelectedRow:
    """One selected row of the source."""

    id: str
    place: str  # the source place: "train.jsonl line 7"
    conversation: Conversation  # a prompt/response row: a user turn and an assistant turn
    record: Mapping[str, object] | None  # a conversation row as read (JSON values)
    columns: ConversationColumns | None  # a conversation row's format; None: prompt/response


def _named(row: SelectedRow) -> str:
    return f"{row.place} (id {row.id})"


def keep_source_records(rows: Sequence[SelectedRow], fmt: ExportFormat) -> bool:
    """Whether every row goes out as read: all in one layout of `fmt` itself, and (messages)
    in the shape TRL reads: a `messages` column of string contents, no system column."""
    layouts = {row.columns for row in rows}
    if len(layouts) != 1:
        return False
    (columns,) = layouts
    if columns is None or columns.format != fmt:
        return False
    if fmt == "sharegpt":
        return True  # dataset_info.json names its columns and tags
    plain = columns.messages == "messages" and columns.system is None
    return plain and columns.tools in (None, "tools") and all(map(_string_contents, rows))


def _string_contents(row: SelectedRow) -> bool:
    turns = (row.record or {}).get("messages")
    return isinstance(turns, list) and all(
        isinstance(turn, Mapping) and isinstance(turn.get("content"), str | None) for turn in turns
    )


def _tool_call_value(calls: tuple[ToolCall, ...]) -> str:
    """A function_call turn's value: {"name", "arguments"} (a list for parallel calls)."""
    items = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
    return json_text(items[0] if len(items) == 1 else items)


def messages_record(row: SelectedRow) -> dict[str, object]:
    turns: list[dict[str, object]] = []
    for turn in row.conversation.turns:
        item: dict[str, object] = {"role": turn.role, "content": turn.content}
        if turn.reasoning is not None:
            item["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            item["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in turn.tool_calls
            ]
        turns.append(item)
    record: dict[str, object] = {"messages": turns}
    if row.conversation.tools is not None:
        record["tools"] = row.conversation.tools
    return record


def _split_system(row: SelectedRow) -> tuple[str | None, tuple[Turn, ...]]:
    turns = row.conversation.turns
    if turns and turns[0].role == "system":
        return turns[0].content, turns[1:]
    return None, turns


def _sharegpt_turn(turn: Turn, index: int, row: SelectedRow, tags: SharegptTags) -> dict:
    """Turn `index` (canonical, after any system turn) in the place LLaMA-Factory reads it."""
    expected = ("a user or tool turn", "an assistant turn")[index % 2]
    if turn.role == "user" or turn.role == "tool":
        tag = tags.user_tag if turn.role == "user" else tags.observation_tag
        fits, value = index % 2 == 0, turn.content
    elif (
        turn.role == "assistant"
        and turn.reasoning is None
        and not (turn.tool_calls and turn.content)
    ):
        tag = tags.function_tag if turn.tool_calls else tags.assistant_tag
        fits = index % 2 == 1
        value = _tool_call_value(turn.tool_calls) if turn.tool_calls else turn.content
    else:
        what = "reasoning" if turn.reasoning is not None else "both text and tool calls"
        what = "a system prompt after the first turn" if turn.role == "system" else what
        raise ExportError(
            f"{_named(row)}: turn {index}: {what} has no sharegpt form; export as messages"
        )
    if not fits:
        raise ExportError(
            f"{_named(row)}: turn {index} is a {turn.role} turn where LLaMA-Factory's sharegpt "
            f"needs {expected} (turns alternate; it skips such rows); export as messages"
        )
    return {tags.role_tag: tag, tags.content_tag: value}


def sharegpt_record(row: SelectedRow) -> dict[str, object]:
    tags = SharegptTags()
    system, turns = _split_system(row)
    pairs = [_sharegpt_turn(turn, index, row, tags) for index, turn in enumerate(turns)]
    if len(pairs) % 2:
        raise ExportError(
            f"{_named(row)}: ends on a {turns[-1].role} turn; LLaMA-Factory's sharegpt needs "
            "an assistant turn last (it skips such rows); export as messages"
        )
    record: dict[str, object] = {"conversations": pairs}
    if system is not None:
        record["system"] = system
    if row.conversation.tools is not None:
        record["tools"] = row.conversation.tools
    return record


def alpaca_record(row: SelectedRow) -> dict[str, object]:
    system, turns = _split_system(row)
    single = (
        len(turns) == 2
        and (turns[0].role, turns[1].role) == ("user", "assistant")
        and not turns[1].tool_calls
        and turns[1].reasoning is None
    )
    if not single:
        shape = ", ".join(t.role + (" (tool call)" if t.tool_calls else "") for t in turns)
        raise ExportError(
            f"{_named(row)}: alpaca holds one user turn and one plain reply, this row has "
            f"{len(turns)} turns ({shape}); export as messages or sharegpt"
        )
    record: dict[str, object] = {
        "instruction": turns[0].content,
        "input": "",
        "output": turns[1].content,
    }
    if system is not None:
        record["system"] = system
    if row.conversation.tools is not None:
        record["tools"] = row.conversation.tools
    return record


RECORD_BUILDERS = {
    "messages": messages_record,
    "sharegpt": sharegpt_record,
    "alpaca": alpaca_record,
}


def plain_value(value: Any) -> Any:
    """A cell as JSON data: numpy arrays and scalars (Parquet, hub datasets) as lists and
    numbers, NaN (a key the row lacks, filled in by pandas) as None."""
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_value(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return plain_value(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass(frozen=True)
class Exported:
    """The records to write, the dataset_info.json entry (None: messages), and whether the
    rows went out as read."""

    records: list[dict[str, object]]
    dataset_info: dict[str, object] | None
    kept: bool


def _fill(records: list[dict[str, object]], optional: tuple[str, ...]) -> list[str]:
    """Every record gets each optional column any record has ("" where it had none): one
    schema for the file. Returns the columns present."""
    present = [name for name in optional if any(name in r for r in records)]
    for record in records:
        for name in present:
            record.setdefault(name, "")
    return present


def export_records(
    rows: Sequence[SelectedRow], fmt: ExportFormat, file_name: str, tags: SharegptTags
) -> Exported:
    """The rows in `fmt`, with LLaMA-Factory's dataset_info.json entry for file_name (`tags`:
    the source's, for sharegpt rows kept as read). Raises ExportError naming the first row
    that has no form in `fmt`."""
    records = [RECORD_BUILDERS[fmt](row) for row in rows]  # checks every row's shape
    kept = keep_source_records(rows, fmt)
    if fmt == "messages":
        return Exported([dict(r.record or {}) for r in rows] if kept else records, None, kept)
    entry: dict[str, object] = {"file_name": file_name, "formatting": fmt}
    if kept:  # sharegpt as read: the source's own columns and tags
        columns = rows[0].columns
        assert columns is not None  # kept: a conversation layout
        named = {"messages": columns.messages, "system": columns.system, "tools": columns.tools}
        entry["columns"] = {key: name for key, name in named.items() if name is not None}
        entry["tags"] = tags.model_dump()
        return Exported([dict(r.record or {}) for r in rows], entry, kept)
    optional = _fill(records, ("system", "tools"))
    columns_of = {"sharegpt": {"messages": "conversations"}, "alpaca": dict(ALPACA_COLUMNS)}
    entry["columns"] = columns_of[fmt] | {name: name for name in optional}
    if fmt == "sharegpt":
        entry["tags"] = SharegptTags().model_dump()
    return Exported(records, entry, kept)
