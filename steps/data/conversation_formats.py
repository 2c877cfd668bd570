"""Conversation source formats: which format a source is in (data.format), and one row of
it read into the canonical Conversation (steps/data/conversations.py).

messages (OpenAI/TRL): a list of {role, content}; content is a string or a list of typed
parts ({"type": "text", "text"|"value": ...}, LLaMA-Factory's "reasoning" and "tool_call"
parts); an assistant turn may carry OpenAI `tool_calls` and `reasoning_content`.
sharegpt: a list of {from, value} turns whose keys and role tags are settings
(data.conversation.tags); a function_call turn becomes an assistant turn's tool call, an
observation a tool turn. Both may have a `system` column (the first turn) and a `tools`
column (a JSON list).

A row whose shape is not the format's (a turn that is not an object, a key the tags do not
name) is a ConversationError naming the row, turn and setting: the mapping is wrong, not the
row. What is wrong with one conversation's content (an unknown role, tool JSON that does not
parse) is a Finding, so that the row can be quarantined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from steps.data.batch import Batch
from steps.data.conversation_checks import Finding, check_conversation
from steps.data.conversation_config import (
    DEFAULT_MESSAGES_COLUMNS,
    ConversationConfig,
    ConversationFormat,
    DataFormat,
    SharegptTags,
)
from steps.data.conversation_turns import (
    ConversationError,
    as_list,
    is_null,
    mapping_at,
    read_messages_turn,
    read_sharegpt_turn,
    read_system,
    read_tools,
)
from steps.data.conversations import Conversation, Turn
from steps.data.fields import field_columns
from steps.data.ingest_config import IngestConfig
from steps.data.local_files import IngestError

__all__ = [
    "ConversationColumns",
    "ConversationError",
    "DetectedFormat",
    "ReadConversation",
    "conversation_columns",
    "detect_format",
    "read_conversation",
    "read_conversations",
]


@dataclass(frozen=True)
class DetectedFormat:
    format: str  # prompt_response, text, messages or sharegpt
    message: str  # how it was decided, for the run's log


def _conversation_fits(columns: Sequence[str]) -> dict[str, list[str]]:
    return {fmt: [col] for fmt, col in DEFAULT_MESSAGES_COLUMNS.items() if col in columns}


def detect_format(
    columns: Sequence[str],
    data: IngestConfig,
    requested: DataFormat,
    conversation: ConversationConfig,
    source: str,
) -> DetectedFormat:
    """data.format resolved against a source's columns. auto: data.text_field set → text;
    otherwise the one format whose columns are present (prompt_response: every column
    data.prompt_field and data.response_field read; text: a lone `text` column; messages: a
    `messages` column; sharegpt: a `conversations` column). None or several is an error
    naming the columns."""
    if requested != "auto":
        return DetectedFormat(requested, f"{source}: data.format {requested}")
    if conversation.messages_column is not None:
        raise IngestError(
            f"{source}: data.conversation.messages_column = {conversation.messages_column!r} "
            "needs data.format messages or sharegpt (auto cannot tell them apart in a column "
            "of your naming)"
        )
    if data.text_field is not None:
        return DetectedFormat("text", f"{source}: data.format auto: text (data.text_field set)")
    prompt_columns = list(
        dict.fromkeys(c for f in (data.prompt_field, data.response_field) for c in field_columns(f))
    )
    fits: dict[str, list[str]] = {}
    if all(c in columns for c in prompt_columns):
        fits["prompt_response"] = prompt_columns
    if list(columns) == ["text"]:
        fits["text"] = ["text"]
    fits.update(_conversation_fits(columns))
    if len(fits) == 1:
        ((fmt, used),) = fits.items()
        return DetectedFormat(fmt, f"{source}: data.format auto: {fmt} (columns {used})")
    if not fits:
        raise IngestError(
            f"{source}: data.format auto: no format fits columns {list(columns)} "
            f"(prompt_response reads {prompt_columns} from data.prompt_field and "
            "data.response_field; messages a `messages` column; sharegpt a `conversations` "
            "column; text a lone `text` column): set data.format or the fields"
        )
    found = "; ".join(f"{fmt}: {used}" for fmt, used in fits.items())
    raise IngestError(
        f"{source}: data.format auto: columns {list(columns)} fit more than one format "
        f"({found}): set data.format"
    )


@dataclass(frozen=True)
class ConversationColumns:
    """A conversation format resolved against one source's columns."""

    format: ConversationFormat
    messages: str
    system: str | None  # None: the source has no system column
    tools: str | None


def _optional_column(
    columns: Sequence[str], named: str | None, default: str, setting: str, source: str
) -> str | None:
    if named is None:
        return default if default in columns else None
    if named not in columns:
        raise IngestError(
            f"{source}: {setting} = {named!r} names no column; columns present: {list(columns)}"
        )
    return named


def conversation_columns(
    columns: Sequence[str], fmt: ConversationFormat, config: ConversationConfig, source: str
) -> ConversationColumns:
    messages = config.messages_column or DEFAULT_MESSAGES_COLUMNS[fmt]
    if messages not in columns:
        raise IngestError(
            f"{source}: data.format {fmt} reads the turns from column {messages!r} "
            f"(data.conversation.messages_column); columns present: {list(columns)}"
        )
    system = _optional_column(
        columns, config.system_column, "system", "data.conversation.system_column", source
    )
    tools = _optional_column(
        columns, config.tools_column, "tools", "data.conversation.tools_column", source
    )
    return ConversationColumns(fmt, messages, system, tools)


@dataclass(frozen=True)
class ReadConversation:
    """One row read: its conversation (None where a finding leaves it without a canonical
    form), each turn's name in the source ("conversations[3]", "system") and its findings."""

    conversation: Conversation | None
    turn_names: tuple[str, ...]
    findings: tuple[Finding, ...]


def read_conversation(
    record: Mapping[str, object], columns: ConversationColumns, tags: SharegptTags, place: str
) -> ReadConversation:
    """One source row as a Conversation, with its findings (steps/data/conversation_checks.py).

    Turns are named as the source has them, "<column>[<0-based index>]"; the system column's
    turn by the column's name. A null turn list reads as no turns (found: no assistant)."""
    turns: list[Turn] = []
    names: list[str] = []
    findings: list[Finding] = []
    if columns.system is not None:
        system = read_system(record.get(columns.system), place, columns.system)
        if system is not None:
            turns.append(system)
            names.append(columns.system)
    tools = (
        None
        if columns.tools is None
        else read_tools(record.get(columns.tools), place, columns.tools)
    )
    if isinstance(tools, Finding):
        findings.append(tools)
        tools = None
    cell = record.get(columns.messages)
    what = f"column {columns.messages!r} (data.conversation.messages_column)"
    for index, item in enumerate([] if is_null(cell) else as_list(cell, place, what)):
        name = f"{columns.messages}[{index}]"
        turn = mapping_at(item, place, name)
        if columns.format == "messages":
            read = read_messages_turn(turn, place, name)
        else:
            read = read_sharegpt_turn(turn, place, name, tags)
        if isinstance(read, list):
            findings.extend(read)
        else:
            turns.append(read)
            names.append(name)
    if findings:
        return ReadConversation(None, (), tuple(findings))
    conversation = Conversation(tuple(turns), tools)
    found = check_conversation(conversation, place, tuple(names))
    return ReadConversation(conversation, tuple(names), found)


def read_conversations(
    batch: Batch, columns: ConversationColumns, tags: SharegptTags, source: str
) -> list[ReadConversation]:
    """Every row of a batch (steps/data/readers.py), named "<source> <line or record>"."""
    wanted = [c for c in (columns.messages, columns.system, columns.tools) if c is not None]
    records = batch.frame[wanted].to_dict("records")
    return [
        read_conversation(record, columns, tags, f"{source} {where}")
        for record, where in zip(records, batch.where, strict=True)
    ]
