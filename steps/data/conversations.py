"""Conversations: the canonical form of one multi-turn chat example, its JSON and its hash.

Every source format (steps/data/conversation_formats.py) becomes this one value: turns with
roles system, user, assistant and tool; an assistant turn may carry reasoning and tool calls;
the conversation may declare the tools it can call. The JSON is what a staged Parquet string
column holds, and the hash is the dedup and leakage key, as content_id is for prompt/response
rows (steps/data/fields.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal, cast, get_args

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes."""

    name: str
    arguments: str  # canonical JSON text (json_text): equal arguments hash equal


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str  # as the source has it, never stripped
    tool_calls: tuple[ToolCall, ...] | None = None  # assistant turns only
    reasoning: str | None = None  # assistant turns only: thinking shown before the content


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: str | None = None  # canonical JSON of the declared tool list; None: no tools


def json_text(value: object) -> str:
    """The canonical JSON of a parsed value: one spelling for equal values, keys in the order
    the source wrote them (a template shows them in that order)."""
    return json.dumps(value, ensure_ascii=False)


def _turn_dict(turn: Turn) -> dict[str, object]:
    record: dict[str, object] = {"role": turn.role, "content": turn.content}
    if turn.reasoning is not None:
        record["reasoning"] = turn.reasoning
    if turn.tool_calls is not None:
        record["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
    return record


def conversation_json(conversation: Conversation) -> str:
    """The conversation as one line of JSON, byte-stable: fixed key order, absent fields left
    out, no ASCII escaping. conversation_from_json reads it back to an equal value."""
    record: dict[str, object] = {"turns": [_turn_dict(t) for t in conversation.turns]}
    if conversation.tools is not None:
        record["tools"] = conversation.tools
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _tool_calls(value: object) -> tuple[ToolCall, ...] | None:
    if value is None:
        return None
    return tuple(ToolCall(str(c["name"]), str(c["arguments"])) for c in cast(list, value))


def conversation_from_json(text: str) -> Conversation:
    """The value conversation_json wrote; anything else is a ValueError quoting it."""
    try:
        record = json.loads(text)
        turns = tuple(
            Turn(
                role=_role(t["role"]),
                content=str(t["content"]),
                tool_calls=_tool_calls(t.get("tool_calls")),
                reasoning=t.get("reasoning"),
            )
            for t in record["turns"]
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"not a conversation's JSON ({type(error).__name__}: {error}): {text[:80]!r}"
        ) from None
    return Conversation(turns, record.get("tools"))


def _role(value: object) -> Role:
    if value not in ROLES:
        raise ValueError(f"role {value!r} is none of {list(ROLES)}")
    return cast(Role, value)


def conversation_id(conversation: Conversation) -> str:
    """The content hash of a conversation: its id when the source has none, and the key that
    finds exact duplicates and eval/train leakage (16 hex digits, as content_id)."""
    return hashlib.sha256(conversation_json(conversation).encode()).hexdigest()[:16]
