"""Conversation turns and cells read into canonical values (steps/data/conversations.py):
an OpenAI/TRL `messages` turn, a ShareGPT turn, tool calls, the tools and system columns.

Used by steps/data/conversation_formats.py, which reads whole rows. A cell of the wrong shape
is a ConversationError naming the row, turn and setting; tool JSON that does not parse and an
unknown role are Findings (the row can be quarantined).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from steps.data.conversation_checks import TOOL_JSON, UNKNOWN_ROLE, Finding, blank
from steps.data.conversation_config import SharegptTags
from steps.data.conversations import ROLES, Role, ToolCall, Turn, json_text
from steps.data.local_files import IngestError


class ConversationError(IngestError):
    """A row that is not in the configured conversation format; names row, turn, setting."""


def is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def quote_cell(value: object) -> str:
    return repr(" ".join(str(value).split())[:60])  # one line, whatever it holds


def as_list(value: object, place: str, what: str) -> list:
    """A list cell: JSON arrays, and the numpy arrays Parquet and hub datasets give."""
    if isinstance(value, list | tuple):
        return list(value)
    listed = value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else None
    if isinstance(listed, list):
        return listed
    raise ConversationError(
        f"{place}: {what} is {type(value).__name__} {quote_cell(value)}, expected a list"
    )


def mapping_at(value: object, place: str, name: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConversationError(
            f"{place}: {name} is {type(value).__name__} {quote_cell(value)}, expected an object"
        )
    return value


def _present(turn: Mapping[str, object], key: str) -> object:
    """A key's value, None where absent or null (Parquet structs fill absent keys with null)."""
    value = turn.get(key)
    return None if is_null(value) else value


def _parse_json(text: str) -> tuple[object, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"{error.msg} at character {error.pos}"
    except (ValueError, RecursionError) as error:  # a 5,000-digit integer, deep nesting
        return None, type(error).__name__


def _canonical(value: object) -> str | None:
    try:
        return json_text(value)
    except (TypeError, ValueError):  # not JSON data (a Parquet cell's numpy values)
        return None


def _tool_call(value: object) -> ToolCall | str:
    """{"name", "arguments"} or OpenAI's {"type": "function", "function": {...}}; arguments
    an object or its JSON text. A str: why it is not a tool call."""
    if isinstance(value, Mapping) and isinstance(value.get("function"), Mapping):
        value = value["function"]
    if not isinstance(value, Mapping):
        return f"a tool call is {type(value).__name__} {quote_cell(value)}, expected an object"
    name = value.get("name")
    if not isinstance(name, str) or blank(name):
        return f"a tool call without a 'name': {quote_cell(_canonical(value) or value)}"
    arguments = _present(value, "arguments")
    if arguments is None:
        return f"tool call {name!r} has no 'arguments'"
    if isinstance(arguments, str):
        arguments, error = _parse_json(arguments)
        if error is not None:
            quoted = quote_cell(value["arguments"])
            return f"tool call {name!r}: arguments are not JSON ({error}): {quoted}"
    text = _canonical(arguments)
    if text is None:
        return f"tool call {name!r}: arguments are not JSON data"
    return ToolCall(name, text)


def _tool_calls_text(text: str) -> tuple[ToolCall, ...] | str:
    """A tool call's JSON text: one call, or a list of parallel calls."""
    value, error = _parse_json(text)
    if error is not None:
        return f"tool call is not JSON ({error}): {quote_cell(text)}"
    items = value if isinstance(value, list) else [value]
    calls = [_tool_call(item) for item in items] or ["an empty list of tool calls"]
    problems = [c for c in calls if isinstance(c, str)]
    return problems[0] if problems else tuple(cast(list[ToolCall], calls))


@dataclass
class _TurnParts:
    texts: list[str]
    reasoning: list[str]
    calls: list[ToolCall]
    findings: list[Finding]


def _content_parts(content: object, parts: _TurnParts, place: str, name: str) -> None:
    for index, item in enumerate(as_list(content, place, f"{name}.content")):
        part = mapping_at(item, place, f"{name}.content[{index}]")
        kind = _present(part, "type")
        text = _present(part, "text")
        text = _present(part, "value") if text is None else text
        if kind not in ("text", "reasoning", "tool_call"):
            raise ConversationError(
                f"{place}: {name}.content[{index}] is a {kind!r} part: Sift reads text, "
                "reasoning and tool_call parts"
            )
        if not isinstance(text, str):
            raise ConversationError(
                f"{place}: {name}.content[{index}]: a {kind} part without a string 'text' or "
                f"'value' (keys: {list(part)})"
            )
        if kind == "text":
            parts.texts.append(text)
        elif kind == "reasoning":
            parts.reasoning.append(text)
        else:
            _add_calls(_tool_calls_text(text), parts, place, f"{name}.content[{index}]")


def _add_calls(
    calls: tuple[ToolCall, ...] | ToolCall | str, parts: _TurnParts, place: str, name: str
) -> None:
    if isinstance(calls, str):
        parts.findings.append(Finding(TOOL_JSON, place, name, calls))
    else:
        parts.calls.extend(calls if isinstance(calls, tuple) else (calls,))


def read_messages_turn(turn: Mapping[str, object], place: str, name: str) -> Turn | list[Finding]:
    role = _present(turn, "role")
    if role is None:
        hint = (
            ": ShareGPT turns ({from, value}) need data.format sharegpt" if "from" in turn else ""
        )
        raise ConversationError(f"{place}: {name} has no 'role' (keys: {list(turn)}){hint}")
    if role not in ROLES:
        return [
            Finding(
                UNKNOWN_ROLE,
                place,
                name,
                f"role {role!r} is none of {', '.join(ROLES)} (data.format messages); map other "
                "role names with data.format sharegpt and data.conversation.tags",
            )
        ]
    parts = _TurnParts([], [], [], [])
    content = _present(turn, "content")
    if isinstance(content, str):
        parts.texts.append(content)
    elif content is not None:
        _content_parts(content, parts, place, name)
    calls = _present(turn, "tool_calls")
    for index, call in enumerate(
        [] if calls is None else as_list(calls, place, f"{name}.tool_calls")
    ):
        _add_calls(_tool_call(call), parts, place, f"{name}.tool_calls[{index}]")
    reasoning = _present(turn, "reasoning_content")
    if reasoning is not None:
        parts.reasoning.append(str(reasoning))
    if role != "assistant" and (parts.calls or parts.reasoning):
        raise ConversationError(
            f"{place}: {name}: a {role} turn with tool calls or reasoning (assistant turns only)"
        )
    if parts.findings:
        return parts.findings
    return Turn(
        role=cast(Role, role),
        content="".join(parts.texts),
        tool_calls=tuple(parts.calls) or None,
        reasoning="".join(parts.reasoning) if parts.reasoning else None,
    )


def _tag_map(tags: SharegptTags) -> str:
    return ", ".join(f"{tag} → {role}" for tag, role in tags.roles().items())


def read_sharegpt_turn(
    turn: Mapping[str, object], place: str, name: str, tags: SharegptTags
) -> Turn | list[Finding]:
    tag = _present(turn, tags.role_tag)
    if tag is None:
        hint = (
            ": OpenAI turns ({role, content}) need data.format messages" if "role" in turn else ""
        )
        raise ConversationError(
            f"{place}: {name} has no {tags.role_tag!r} (data.conversation.tags.role_tag; keys: "
            f"{list(turn)}){hint}"
        )
    content = _present(turn, tags.content_tag)
    if tags.content_tag not in turn:
        raise ConversationError(
            f"{place}: {name} has no {tags.content_tag!r} (data.conversation.tags.content_tag; "
            f"keys: {list(turn)})"
        )
    if content is not None and not isinstance(content, str):
        raise ConversationError(
            f"{place}: {name}.{tags.content_tag} is {type(content).__name__} "
            f"{quote_cell(content)}, expected a string"
        )
    text = content or ""
    roles = tags.roles()
    if tag not in roles:
        return [
            Finding(
                UNKNOWN_ROLE,
                place,
                name,
                f"role tag {tag!r} is not one data.conversation.tags maps ({_tag_map(tags)})",
            )
        ]
    if tag == tags.function_tag:
        calls = _tool_calls_text(text)
        if isinstance(calls, str):
            return [Finding(TOOL_JSON, place, name, calls)]
        return Turn("assistant", "", tool_calls=calls)
    return Turn(cast(Role, roles[str(tag)]), text)


def read_tools(value: object, place: str, column: str) -> str | Finding | None:
    """The tools column: a JSON list (text, or a list cell); empty or null: no tools."""
    if is_null(value) or (isinstance(value, str) and blank(value)):
        return None
    parsed: object = value
    if isinstance(value, str):
        parsed, error = _parse_json(value)
        if error is not None:
            return Finding(
                TOOL_JSON, place, column, f"tools are not JSON ({error}): {quote_cell(value)}"
            )
    elif not isinstance(value, list | tuple):
        parsed = as_list(value, place, f"column {column!r}")
    if not isinstance(parsed, list | tuple):
        return Finding(
            TOOL_JSON, place, column, f"tools are a JSON {type(parsed).__name__}, expected a list"
        )
    text = _canonical(list(parsed))
    if text is None:
        return Finding(TOOL_JSON, place, column, "tools are not JSON data")
    return text if parsed else None


def read_system(value: object, place: str, column: str) -> Turn | None:
    """The system column as the first turn; an empty cell is no system prompt."""
    if is_null(value) or (isinstance(value, str) and blank(value)):
        return None
    if not isinstance(value, str):
        raise ConversationError(
            f"{place}: column {column!r} (data.conversation.system_column) is "
            f"{type(value).__name__} {quote_cell(value)}, expected a string"
        )
    return Turn("system", value)
