"""Per-conversation checks: what makes a conversation unfit to train on, each finding naming
its source place and turn, so that validation can quarantine the row with the reason.

A finding's `check` is its quarantine reason (as an expectation's type is for prompt/response
rows, steps/data/findings.py); `line()` is the message, "<file> record 7: conversations[3]:
...". "Empty" means no visible character, as in steps/data/checks.py: whitespace, control
(Unicode Cc) and format characters (Cf: zero-width space, joiners, BOM) show nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from steps.data.conversations import Conversation, Role, Turn
from steps.data.invisible import BLANK

# Quarantine reasons, one per check.
ROLE_ORDER = "conversation_role_order"
EMPTY_TURN = "conversation_empty_turn"
UNKNOWN_ROLE = "conversation_unknown_role"
NO_ASSISTANT = "conversation_no_assistant"
TOOL_JSON = "conversation_tool_json"
TOO_LONG = "conversation_too_long"  # truncation left no loss token (steps/chat_encoding.py)

# The roles an assistant turn may follow: it answers a user or reads a tool's result.
ASSISTANT_AFTER: frozenset[Role] = frozenset({"user", "tool"})


@dataclass(frozen=True)
class Finding:
    """One problem of one conversation."""

    check: str  # one of the reasons above
    place: str  # the source row: "glaive.json record 7", "train.jsonl line 12"
    where: str | None  # the turn or column: "conversations[3]", "tools"; None: the whole row
    detail: str

    def line(self) -> str:
        where = f"{self.where}: " if self.where else ""
        return f"{self.place}: {where}{self.detail}"


def blank(text: str) -> bool:
    """No visible character (whitespace, controls, format characters): the expectation
    suite's own definition (steps/data/invisible.py), so a turn is empty exactly when a
    prompt/response text would be."""
    return _BLANK.match(text) is not None


_BLANK = re.compile(BLANK)


def _empty(turn: Turn) -> bool:
    """Nothing to show or learn: no visible content, reasoning or tool call."""
    return blank(turn.content) and not turn.tool_calls and blank(turn.reasoning or "")


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _order_finding(turns: tuple[Turn, ...], index: int) -> str | None:
    """Why turn `index` may not stand where it does, or None."""
    role = turns[index].role
    before = turns[index - 1] if index else None
    if role == "system" and before is not None:
        return "a system turn after the first turn (a system prompt opens the conversation)"
    after = f"follows {_a(before.role)} turn" if before else "opens the conversation"
    if role == "assistant" and (before is None or before.role not in ASSISTANT_AFTER):
        return f"an assistant turn {after}; it must follow a user or tool turn"
    if role == "tool" and not (before and (before.role == "tool" or before.tool_calls)):
        return f"a tool turn {after}; it must follow an assistant's tool call or another tool turn"
    return None


def check_conversation(
    conversation: Conversation, place: str, turn_names: tuple[str, ...] | None = None
) -> tuple[Finding, ...]:
    """Role order, empty turns and a missing assistant turn, each finding naming the turn.

    `turn_names` names each turn as its source does ("conversations[3]", "system"); None:
    "turns[k]", the canonical index (a conversation read back from its JSON)."""
    turns = conversation.turns
    names = turn_names or tuple(f"turns[{k}]" for k in range(len(turns)))
    found: list[Finding] = []
    for index, turn in enumerate(turns):
        order = _order_finding(turns, index)
        if order is not None:
            found.append(Finding(ROLE_ORDER, place, names[index], order))
        if _empty(turn):
            quoted = f" ({turn.content[:40]!r})" if turn.content else ""
            found.append(
                Finding(EMPTY_TURN, place, names[index], f"empty {turn.role} turn{quoted}")
            )
    if not any(turn.role == "assistant" for turn in turns):
        roles = ", ".join(turn.role for turn in turns) or "no turns"
        found.append(
            Finding(NO_ASSISTANT, place, None, f"no assistant turn to learn from ({roles})")
        )
    return tuple(found)
