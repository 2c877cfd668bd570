"""A staged table's rows as model inputs, whichever kind it holds: prompt/response rows
(steps/modeling.py encode_examples, model.prompt_format) or conversations (steps/
chat_encoding.py encode_conversation: a chat template, the loss on assistant turns).

Embed, fine-tune, the held-out loss and validation's length check all encode through here,
so all of them see the same tokens. What changes a conversation's tokens beyond the model
section, the template and data.conversation.train_on, travels as one value (ChatEncoding),
resolved once per run (chat_encoding) and part of every cache key that encoding feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from steps.chat_encoding import (
    ChatTemplateError,
    encode_conversation,
    resolve_chat_template,
    template_messages,
    template_tools,
)
from steps.data.conversation_config import TrainOn
from steps.data.conversation_ingest import CONVERSATION_COLUMN, is_conversation_table
from steps.data.conversations import Conversation, conversation_from_json
from steps.data.ingest_config import IngestConfig
from steps.modeling import (
    Encoded,
    ModelConfig,
    PromptShape,
    encode_examples,
    load_tokenizer,
    prompt_shape as model_prompt_shape,
)


class ChatEncoding(BaseModel):
    """How conversations become tokens: the template's Jinja source and the turns that carry
    the loss (a value: resolved from data.chat_template or the model's tokenizer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(description="The chat template's Jinja source.")
    train_on: TrainOn = Field(description="data.conversation.train_on.")


def chat_encoding(
    tables: Sequence[str | Path], data: IngestConfig, model: ModelConfig, project_dir: Path
) -> ChatEncoding | None:
    """The ChatEncoding of a run whose tables (staged or published) hold conversations; None
    when none does (prompt/response rows need none). data.chat_template wins over the model's
    own template; neither is a ChatTemplateError naming both settings."""
    if not any(is_conversation_table(table) for table in tables):
        return None
    tokenizer = load_tokenizer(model)
    template = resolve_chat_template(tokenizer, data.chat_template, project_dir, model.name)
    return ChatEncoding(template=template, train_on=data.conversation.train_on)


def is_conversation_frame(frame: pd.DataFrame) -> bool:
    return CONVERSATION_COLUMN in frame.columns


def _row_names(frame: pd.DataFrame) -> list[str]:
    """Each row as messages name it: its id (a column, or the index of a frame keyed on it)."""
    ids = frame["id"] if "id" in frame.columns else frame.index
    return [f"id {value}" for value in ids]


def _needs_chat(chat: ChatEncoding | None) -> ChatEncoding:
    if chat is None:
        raise ChatTemplateError(
            "this table holds conversations, and no chat template was resolved for them "
            "(steps/encoding.py chat_encoding: data.chat_template or the model's own)"
        )
    return chat


def encode_table(
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    model: ModelConfig,
    chat: ChatEncoding | None,
) -> list[Encoded]:
    """Input ids and labels of every row of a staged table, in order. Prompt/response rows:
    encode_examples, unchanged. Conversations: rendered with chat.template, labels on the
    assistant turns chat.train_on names, cut by whole turns to model.max_length; a row left
    without a loss token is an error naming it (validation quarantines such rows)."""
    if not is_conversation_frame(frame):
        return encode_examples(tokenizer, list(frame.prompt), list(frame.response), model)
    chat = _needs_chat(chat)
    encoded = []
    for name, text in zip(_row_names(frame), frame[CONVERSATION_COLUMN], strict=True):
        done = encode_conversation(
            tokenizer,
            conversation_from_json(text),
            chat.template,
            model.max_length,
            chat.train_on,
            place=name,
        )
        if done.encoded is None:
            raise ValueError(f"{done.reason} (validation quarantines such rows)")
        encoded.append(done.encoded)
    return encoded


def _before_last_reply(conversation: Conversation) -> list[dict]:
    """The turns before the last assistant turn, as templates read them."""
    last = max(k for k, turn in enumerate(conversation.turns) if turn.role == "assistant")
    return template_messages(conversation)[:last]


def generation_prompts(
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    model: ModelConfig,
    chat: ChatEncoding | None,
) -> tuple[list[str], PromptShape]:
    """What a model answers for sample generations, and how that text is tokenized.
    Prompt/response rows: their prompts, shown through model.prompt_format. Conversations:
    each rendered up to its last assistant turn, followed by the assistant's opener."""
    if not is_conversation_frame(frame):
        return list(frame.prompt), model_prompt_shape(tokenizer, model)
    chat = _needs_chat(chat)
    prompts = []
    for text in frame[CONVERSATION_COLUMN]:
        conversation = conversation_from_json(text)
        rendered = tokenizer.apply_chat_template(
            _before_last_reply(conversation),
            tools=template_tools(conversation),
            chat_template=chat.template,
            tokenize=False,
            add_generation_prompt=True,
        )
        prompts.append(str(rendered))
    # The template writes the special tokens it wants, as in training (chat_encoding.py).
    return prompts, PromptShape(text=lambda prompt: prompt, add_special_tokens=False, end_ids=())
