"""Conversations as token ids and labels: rendered with a chat template, the loss on the
assistant turns and nothing else, cut to max_length by whole turns.

A template with `{% generation %}` blocks marks the assistant's tokens itself (transformers'
return_assistant_tokens_mask, the TRL convention: the block holds the reply and its
end-of-turn token). Any other template is rendered over growing prefixes of the conversation:
an assistant turn's tokens are those the conversation through it adds to the conversation
before it followed by the assistant's opener (add_generation_prompt), up to the end-of-turn
token (trailing whitespace is left unlabelled, as steps/modeling.py _chat_shape does). That
needs a template that renders a conversation's start the same whatever follows; one that
does not (it drops earlier turns' reasoning, say) is refused, naming data.chat_template.

Every rendering is checked against the conversation: a template that leaves out a turn's
text, reasoning or tool calls (many ignore `tool_calls`) would teach the model replies it
never sees whole, so it is an error naming the turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from jinja2 import TemplateError
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from steps.data.conversation_config import TrainOn
from steps.data.conversations import Conversation, Turn
from steps.modeling import IGNORE_INDEX, Encoded

CHAT_TEMPLATE_SETTING = "data.chat_template"
JINJA_SUFFIXES = (".jinja", ".j2", ".jinja2")
# transformers' own test for a template that marks assistant tokens (chat_template_utils.py).
GENERATION_BLOCK = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


class ChatTemplateError(ValueError):
    """A chat template that cannot render or mask a conversation; names turn and setting."""


def load_chat_template(value: str, project_dir: Path) -> str:
    """data.chat_template's Jinja source: a .jinja/.j2 file, or the chat template of a
    tokenizer (a folder, relative to the project, or a hub id)."""
    path = Path(value) if Path(value).is_absolute() else project_dir / value
    if path.suffix in JINJA_SUFFIXES:
        if not path.is_file():
            raise ChatTemplateError(f"{CHAT_TEMPLATE_SETTING} = {value!r}: no file at {path}")
        return path.read_text("utf-8")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else value)
    except (OSError, ValueError) as error:
        raise ChatTemplateError(
            f"{CHAT_TEMPLATE_SETTING} = {value!r}: neither a {'/'.join(JINJA_SUFFIXES)} file "
            f"nor a tokenizer that loads ({type(error).__name__}: {' '.join(str(error).split())})"
        ) from None
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(
            f"{CHAT_TEMPLATE_SETTING} = {value!r}: the tokenizer there has no chat template"
        )
    return template


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None, project_dir: Path, model: str
) -> str:
    """The template conversations are rendered with: data.chat_template when set (it wins
    over the model's own), else the model tokenizer's; neither is an error naming both."""
    if chat_template is not None:
        return load_chat_template(chat_template, project_dir)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()  # a dict of named templates: its "default"
    raise ChatTemplateError(
        f"model.name = {model!r}: its tokenizer has no chat template to render conversations; "
        f"name one with {CHAT_TEMPLATE_SETTING} (a {'/'.join(JINJA_SUFFIXES)} file, a tokenizer "
        "folder or a hub id)"
    )


def template_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The turns as transformers' chat templates read them: tool calls in OpenAI's shape with
    parsed arguments, reasoning as `reasoning_content` (Qwen3, DeepSeek-R1)."""
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.reasoning is not None:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                }
                for call in turn.tool_calls
            ]
        messages.append(message)
    return messages


def template_tools(conversation: Conversation) -> list | None:
    return None if conversation.tools is None else json.loads(conversation.tools)


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered and tokenized, with each assistant turn's tokens."""

    input_ids: list[int]
    spans: tuple[tuple[int, int], ...]  # per assistant turn, in order: token [start, end)
    assistant_turns: tuple[int, ...]  # the turn index of each span


@dataclass(frozen=True)
class _Chat:
    tokenizer: PreTrainedTokenizerBase
    template: str
    place: str

    def text(self, conversation: Conversation, turns: int, opener: bool) -> str:
        """The first `turns` turns rendered; `opener`: followed by the assistant's opener."""
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    template_messages(conversation)[:turns],
                    tools=template_tools(conversation),
                    chat_template=self.template,
                    tokenize=False,
                    add_generation_prompt=opener,
                )
            )
        except TemplateError as error:
            raise ChatTemplateError(
                f"{self.place}: the chat template ({CHAT_TEMPLATE_SETTING}) fails on turns[:"
                f"{turns}]: {error}"
            ) from None

    def ids(self, text: str) -> list[int]:
        # The template writes the special tokens it wants (BOS), as apply_chat_template does;
        # verbose=False: a conversation longer than the model's context is cut later, by turns.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _assistant_turns(conversation: Conversation) -> tuple[int, ...]:
    return tuple(k for k, turn in enumerate(conversation.turns) if turn.role == "assistant")


def _prefix_spans(chat: _Chat, conversation: Conversation) -> Rendered:
    """Each assistant turn's tokens: what rendering through it adds to the rendering before
    it with the assistant's opener, every rendering a token prefix of the whole."""
    ids = chat.ids(chat.text(conversation, len(conversation.turns), opener=False))
    assistant = _assistant_turns(conversation)
    spans = []
    for k in assistant:
        before = chat.ids(chat.text(conversation, k, opener=True)) if k else []
        through = chat.ids(chat.text(conversation, k + 1, opener=False).rstrip())
        if through[: len(before)] != before:
            raise ChatTemplateError(
                f"{chat.place}: turns[{k}]: the chat template opens an assistant turn otherwise "
                "than its add_generation_prompt does, so the reply's tokens cannot be told "
                f"apart; use a template with {{% generation %}} blocks ({CHAT_TEMPLATE_SETTING})"
            )
        if ids[: len(through)] != through:
            raise ChatTemplateError(
                f"{chat.place}: turns[{k}]: the chat template renders the conversation up to this "
                "turn otherwise once later turns follow (or its tokens merge across the turn's "
                f"end); use a template with {{% generation %}} blocks ({CHAT_TEMPLATE_SETTING})"
            )
        spans.append((len(before), len(through)))
    return Rendered(ids, tuple(spans), assistant)


def _generation_spans(chat: _Chat, conversation: Conversation) -> Rendered:
    """Each assistant turn's tokens as the template's {% generation %} blocks mark them."""
    try:
        out = cast(
            BatchEncoding,
            chat.tokenizer.apply_chat_template(
                template_messages(conversation),
                tools=template_tools(conversation),
                chat_template=chat.template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            ),
        )
    except TemplateError as error:
        raise ChatTemplateError(
            f"{chat.place}: the chat template ({CHAT_TEMPLATE_SETTING}) fails: {error}"
        ) from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
    ends = [t + 1 for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
    assistant = _assistant_turns(conversation)
    if len(starts) != len(assistant):
        raise ChatTemplateError(
            f"{chat.place}: the chat template's {{% generation %}} blocks mark {len(starts)} "
            f"spans of tokens for {len(assistant)} assistant turns ({CHAT_TEMPLATE_SETTING})"
        )
    return Rendered(ids, tuple(zip(starts, ends, strict=True)), assistant)


# How assistant tokens are found, by mask_method: a dict, so a test can run both on a
# template with generation blocks and prove them equal.
MASKERS: dict[str, Callable[[_Chat, Conversation], Rendered]] = {
    "generation": _generation_spans,
    "prefix": _prefix_spans,
}


def mask_method(template: str) -> str:
    return "generation" if GENERATION_BLOCK.search(template) else "prefix"


def _words(text: str) -> str:
    return " ".join(text.split())  # tokenizers may re-space text (SentencePiece's "▁")


def _turn_pieces(turn: Turn) -> list[tuple[str, str]]:
    """(what, text) the rendering must show of a turn."""
    pieces = [("text", turn.content), ("reasoning", turn.reasoning or "")]
    pieces += [("tool call", call.name) for call in turn.tool_calls or ()]
    return [(what, text) for what, text in pieces if text.strip()]


def _tool_names(conversation: Conversation) -> list[str]:
    tools = template_tools(conversation) or []
    found = [t.get("function", t).get("name") for t in tools if isinstance(t, dict)]
    return [name for name in found if isinstance(name, str)]


def _check_shown(chat: _Chat, conversation: Conversation, rendered: Rendered) -> None:
    """Every turn's text (an assistant turn's within its own tokens), reasoning, tool calls
    and the declared tools appear in the rendering."""

    def decode(ids: list[int]) -> str:
        return str(chat.tokenizer.decode(ids))

    whole = _words(decode(rendered.input_ids))
    own = {
        k: _words(decode(rendered.input_ids[start:end]))
        for k, (start, end) in zip(rendered.assistant_turns, rendered.spans, strict=True)
    }
    for k, turn in enumerate(conversation.turns):
        shown = own.get(k, whole)
        for what, text in _turn_pieces(turn):
            if _words(text) not in shown:
                where = "its labelled tokens" if k in own else "the rendering"
                raise ChatTemplateError(
                    f"{chat.place}: turns[{k}]: the chat template ({CHAT_TEMPLATE_SETTING}) "
                    f"leaves the {turn.role} turn's {what} {_words(text)[:40]!r} out of {where}"
                )
    for name in _tool_names(conversation):
        if name not in whole:
            raise ChatTemplateError(
                f"{chat.place}: the chat template ({CHAT_TEMPLATE_SETTING}) does not show the "
                f"conversation's tools (tool {name!r} is not in the rendering)"
            )


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    template: str,
    place: str = "conversation",
    method: str | None = None,
) -> Rendered:
    """A conversation's ids and assistant-turn spans (method: mask_method(template) unless
    given). The conversation has passed check_conversation: it opens with a system or user
    turn and has an assistant turn."""
    if not conversation.turns or conversation.turns[0].role == "assistant":
        raise ChatTemplateError(f"{place}: a conversation opens with a system or user turn")
    chat = _Chat(tokenizer, template, place)
    rendered = MASKERS[method or mask_method(template)](chat, conversation)
    _check_shown(chat, conversation, rendered)
    return rendered


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation as model inputs, or the reason it has none (quarantine it)."""

    encoded: Encoded | None  # None: no whole turn with loss fits max_length (see reason)
    kept_turns: int  # the whole turns kept, from the first
    reason: str | None = None


def _labelled(rendered: Rendered, train_on: TrainOn) -> Encoded:
    ids = rendered.input_ids
    labels = [IGNORE_INDEX] * len(ids)
    spans = rendered.spans if train_on == "all_assistant" else rendered.spans[-1:]
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return Encoded(input_ids=ids, labels=labels)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    template: str,
    max_length: int,
    train_on: TrainOn = "all_assistant",
    place: str = "conversation",
) -> EncodedConversation:
    """Input ids and labels (steps/modeling.py Encoded): labels are the ids of every assistant
    turn (train_on all_assistant) or of the last one (last_assistant), its content, reasoning,
    tool calls and end-of-turn token; IGNORE_INDEX elsewhere.

    Longer than max_length: whole turns are dropped from the end, keeping the conversation
    up to the last assistant turn that fits (last_assistant: the last assistant turn must
    fit). When none fits, `encoded` is None and `reason` says which turn ends where."""
    rendered = render_conversation(tokenizer, conversation, template, place)
    if not rendered.spans:
        return EncodedConversation(None, 0, f"{place}: no assistant turn to learn from")
    if len(rendered.input_ids) <= max_length:
        return EncodedConversation(_labelled(rendered, train_on), len(conversation.turns))
    # From the longest prefix that ends with an assistant turn. A span ending past max_length
    # in the whole rendering ends there in its prefix too (the prefix masks prove it;
    # renderings of generation templates are re-checked below).
    last = len(rendered.spans) - 1
    for index in range(last, -1, -1) if train_on == "all_assistant" else [last]:
        if rendered.spans[index][1] > max_length:
            continue
        kept = rendered.assistant_turns[index] + 1
        prefix = Conversation(conversation.turns[:kept], conversation.tools)
        shorter = render_conversation(tokenizer, prefix, template, place)
        if shorter.spans[-1][1] <= max_length:
            # Only the template's unlabelled tail after the last turn can still be too long.
            cut = Rendered(shorter.input_ids[:max_length], shorter.spans, shorter.assistant_turns)
            return EncodedConversation(_labelled(cut, train_on), kept)
    which = "first" if train_on == "all_assistant" else "last"
    index = 0 if train_on == "all_assistant" else last
    return EncodedConversation(
        None,
        0,
        f"{place}: the {which} assistant turn (turns[{rendered.assistant_turns[index]}]) ends "
        f"at token {rendered.spans[index][1]}, past model.max_length {max_length} "
        f"(data.conversation.train_on {train_on}): no whole turn with loss fits",
    )
