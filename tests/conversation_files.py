"""The bundled conversation slices (assets/data/conversations/) read through Sift's readers,
for the conversation tests: each file's format, and its rows as ReadConversations."""

from __future__ import annotations

from pathlib import Path

from steps.data.conversation_config import ConversationConfig, ConversationFormat
from steps.data.conversation_formats import (
    ReadConversation,
    conversation_columns,
    read_conversations,
)
from steps.data.readers import iter_local

CONVERSATIONS_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "conversations"
# file → the format data.format auto finds in it
BUNDLED: dict[str, ConversationFormat] = {
    "glaive_toolcall_en_demo_20.json": "sharegpt",
    "reason_tool_use_demo_20.jsonl": "messages",
    "fastchat_dummy_conversation_20.json": "sharegpt",
}


def read_file(
    path: Path, fmt: ConversationFormat, config: ConversationConfig | None = None
) -> list[ReadConversation]:
    """Every row of a conversation file, named "<file name> record 7" / "line 7"."""
    config = config or ConversationConfig()
    read: list[ReadConversation] = []
    for batch in iter_local(path, [path.parent], "data.source"):
        columns = conversation_columns(list(batch.frame.columns), fmt, config, path.name)
        read += read_conversations(batch, columns, config.tags, path.name)
    return read


def bundled(name: str) -> list[ReadConversation]:
    return read_file(CONVERSATIONS_DIR / name, BUNDLED[name])
