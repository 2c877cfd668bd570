"""The bundled conversation slices (assets/data/conversations/) read through Sift's readers,
for the conversation tests: each file's format, and its rows as ReadConversations; and the
brute-force reference of ChatML labels (a token is labelled when it starts inside an
assistant's reply, found by a regex over the rendered text)."""

from __future__ import annotations

import re
from pathlib import Path

from steps.chat_encoding import template_messages, template_tools
from steps.data.conversation_config import ConversationConfig, ConversationFormat
from steps.data.conversation_formats import (
    ReadConversation,
    conversation_columns,
    read_conversations,
)
from steps.data.conversations import Conversation
from steps.data.readers import iter_local
from steps.modeling import IGNORE_INDEX

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


# A ChatML reply: from after the assistant's opener through its <|im_end|>.
REPLY = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)


def rendered_text(tokenizer, conversation: Conversation, template: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            template_messages(conversation),
            tools=template_tools(conversation),
            chat_template=template,
            tokenize=False,
        )
    )


def reference_labels(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids of the text, and labels: a token is labelled when it starts inside a reply."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [match.span(1) for match in REPLY.finditer(text)]
    labels = [
        token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
        for token, (offset, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return list(encoded["input_ids"]), labels


def brute_force_fit(tokenizer, conversation: Conversation, template: str, max_length: int):
    """The longest prefix ending with an assistant turn whose reference labels end within
    max_length: (turns kept, ids, labels), or None."""
    for kept in range(len(conversation.turns), 0, -1):
        if conversation.turns[kept - 1].role != "assistant":
            continue
        prefix = Conversation(conversation.turns[:kept], conversation.tools)
        ids, labels = reference_labels(tokenizer, rendered_text(tokenizer, prefix, template))
        if max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) < max_length:
            return kept, ids[:max_length], labels[:max_length]
    return None
