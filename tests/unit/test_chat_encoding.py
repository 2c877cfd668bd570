"""Conversation labels against a brute-force reference on every bundled conversation: the
rendered text's assistant replies (ChatML: from after "<|im_start|>assistant\\n" through
"<|im_end|>"), found by a regex and mapped to tokens by the tokenizer's character offsets.

stories260K has no chat template of its own: it gets the bundled ChatML file
(assets/chat_templates/chatml_tools.jinja, masked by rendering prefixes) and the same
template with {% generation %} blocks (masked by transformers). SmolLM2's tokenizer, when
`make smollm2` has fetched it, is checked too (slow: its GGUF vocabulary loads in ~15 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from steps.chat_encoding import (
    ChatTemplateError,
    encode_conversation,
    load_chat_template,
    mask_method,
    render_conversation,
    resolve_chat_template,
)
from steps.data.conversations import Conversation, Turn
from steps.modeling import IGNORE_INDEX
from steps.packaged_model import PACKAGED_MODELS
from tests.conftest import MODEL_DIR, REPO
from tests.conversation_files import (
    BUNDLED,
    brute_force_fit,
    bundled,
    reference_labels,
    rendered_text as _text,
)

TEMPLATE_FILE = "assets/chat_templates/chatml_tools.jinja"
CHATML = (REPO / TEMPLATE_FILE).read_text()
# The same ChatML with the assistant's reply and its <|im_end|> in a {% generation %} block
# (TRL's convention), so that transformers' return_assistant_tokens_mask finds them.
GENERATION_CHATML = """
{%- if tools -%}
<|im_start|>system{{ '\\n' }}
{%- if messages[0].role == 'system' -%}{{ messages[0].content }}{{ '\\n\\n' }}{%- endif -%}
You may call these tools:{{ '\\n' }}
{%- for tool in tools -%}{{ tool | tojson }}{{ '\\n' }}{%- endfor -%}
<|im_end|>{{ '\\n' }}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
<|im_start|>assistant{{ '\\n' }}
{%- generation -%}
{%- if message.reasoning_content -%}
<think>{{ '\\n' }}{{ message.reasoning_content }}{{ '\\n' }}</think>{{ '\\n\\n' }}
{%- endif -%}
{{- message.content -}}
{%- for call in message.tool_calls or [] -%}
<tool_call>{{ '\\n' }}{{ {'name': call.function.name,
    'arguments': call.function.arguments} | tojson }}{{ '\\n' }}</tool_call>
{%- endfor -%}
<|im_end|>
{%- endgeneration -%}
{{ '\\n' }}
{%- elif not (loop.first and tools and message.role == 'system') -%}
<|im_start|>{{ message.role }}{{ '\\n' }}{{ message.content }}<|im_end|>{{ '\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}
"""
# ChatML that renders roles and text only, as SmolLM2's own template does.
PLAIN_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HUGE = 10**9
# Where `make smollm2` extracts the GGUF (gitignored; not in a fresh clone).
SMOLLM2 = REPO / PACKAGED_MODELS["smollm2"].out_dir / Path(PACKAGED_MODELS["smollm2"].member).name


@pytest.fixture(scope="module")
def stories() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def _conversations() -> list[Conversation]:
    found = [r.conversation for name in BUNDLED for r in bundled(name)]
    assert all(c is not None for c in found)
    return [c for c in found if c is not None]


def _assert_labels_match_reference(tokenizer, conversations, template: str) -> None:
    for conversation in conversations:
        result = encode_conversation(tokenizer, conversation, template, HUGE)
        assert result.encoded is not None and result.kept_turns == len(conversation.turns)
        ids, labels = reference_labels(tokenizer, _text(tokenizer, conversation, template))
        assert result.encoded.input_ids == ids
        assert result.encoded.labels == labels


def test_the_generation_template_marks_and_the_file_does_not():
    assert mask_method(CHATML) == "prefix"
    assert mask_method(GENERATION_CHATML) == "generation"


@pytest.mark.parametrize("template", [CHATML, GENERATION_CHATML], ids=["prefix", "generation"])
def test_labels_are_exactly_the_assistant_replies_on_every_bundled_conversation(stories, template):
    _assert_labels_match_reference(stories, _conversations(), template)


def test_prefix_masks_equal_the_generation_blocks_on_every_bundled_conversation(stories):
    for conversation in _conversations():
        prefix = render_conversation(stories, conversation, GENERATION_CHATML, method="prefix")
        marked = render_conversation(stories, conversation, GENERATION_CHATML, method="generation")
        assert prefix == marked


def test_last_assistant_labels_only_the_final_reply(stories):
    conversation = bundled("glaive_toolcall_en_demo_20.json")[3].conversation
    assert conversation is not None
    every = encode_conversation(stories, conversation, CHATML, HUGE).encoded
    last = encode_conversation(stories, conversation, CHATML, HUGE, "last_assistant").encoded
    assert every is not None and last is not None and last.input_ids == every.input_ids
    rendered = render_conversation(stories, conversation, CHATML)
    start, end = rendered.spans[-1]
    assert last.labels == [IGNORE_INDEX] * start + every.labels[start:end] + [IGNORE_INDEX] * (
        len(every.labels) - end
    )
    assert last.n_loss_tokens == end - start


def test_truncation_keeps_the_longest_whole_turn_prefix_that_fits_as_brute_force_does(stories):
    conversation = bundled("glaive_toolcall_en_demo_20.json")[3].conversation
    assert conversation is not None
    ends = [end for _, end in render_conversation(stories, conversation, CHATML).spans]
    for max_length in sorted({*ends, *(end - 1 for end in ends[1:])}):
        result = encode_conversation(stories, conversation, CHATML, max_length)
        kept, ids, labels = brute_force_fit(stories, conversation, CHATML, max_length)
        assert result.encoded is not None, max_length
        assert (result.kept_turns, result.encoded.input_ids, result.encoded.labels) == (
            kept,
            ids,
            labels,
        )
        assert len(result.encoded.input_ids) <= max_length
        assert conversation.turns[result.kept_turns - 1].role == "assistant"


def test_a_first_assistant_turn_that_does_not_fit_gives_the_reason(stories):
    conversation = bundled("glaive_toolcall_en_demo_20.json")[3].conversation
    assert conversation is not None
    first_end = render_conversation(stories, conversation, CHATML).spans[0][1]
    result = encode_conversation(stories, conversation, CHATML, first_end - 1, place="g record 4")
    assert result.encoded is None and result.kept_turns == 0
    assert result.reason == (
        f"g record 4: the first assistant turn (turns[1]) ends at token {first_end}, past "
        f"model.max_length {first_end - 1} (data.conversation.train_on all_assistant): no whole "
        "turn with loss fits"
    )


def test_last_assistant_never_trades_the_final_reply_for_an_earlier_one(stories):
    conversation = bundled("glaive_toolcall_en_demo_20.json")[3].conversation
    assert conversation is not None
    last_end = render_conversation(stories, conversation, CHATML).spans[-1][1]
    result = encode_conversation(stories, conversation, CHATML, last_end - 1, "last_assistant")
    assert result.encoded is None and "the last assistant turn (turns[11])" in str(result.reason)
    every = encode_conversation(stories, conversation, CHATML, last_end - 1, "all_assistant")
    assert every.kept_turns == 10  # all_assistant keeps the replies before it
    trailing = Conversation((*conversation.turns, Turn("user", "thanks!")), conversation.tools)
    cut = encode_conversation(stories, trailing, CHATML, last_end, "last_assistant")
    assert cut.kept_turns == len(conversation.turns)  # the trailing user turn goes, whole
    whole = encode_conversation(stories, conversation, CHATML, HUGE, "last_assistant")
    assert whole.encoded is not None and cut.encoded is not None
    assert cut.encoded.labels == whole.encoded.labels[:last_end]


def test_a_template_that_drops_tool_calls_is_refused_naming_turn_and_setting(stories):
    conversation = bundled("glaive_toolcall_en_demo_20.json")[0].conversation
    assert conversation is not None
    with pytest.raises(ChatTemplateError) as error:
        encode_conversation(stories, conversation, PLAIN_CHATML, HUGE, place="g record 1")
    assert str(error.value) == (
        "g record 1: turns[3]: the chat template (data.chat_template) leaves the assistant "
        "turn's tool call 'search_recipes' out of its labelled tokens"
    )
    no_calls = Conversation(conversation.turns[:2], conversation.tools)
    with pytest.raises(ChatTemplateError, match="does not show the conversation's tools"):
        encode_conversation(stories, no_calls, PLAIN_CHATML, HUGE)


def test_a_template_that_renders_earlier_turns_otherwise_later_is_refused(stories):
    # Reasoning shown on the last message only (as Qwen3 drops it from earlier turns).
    last_only = CHATML.replace(
        "{%- if message.reasoning_content -%}", "{%- if message.reasoning_content and loop.last -%}"
    )
    conversation = bundled("reason_tool_use_demo_20.jsonl")[1].conversation
    assert conversation is not None
    with pytest.raises(ChatTemplateError, match=r"turns\[2\]: the chat template renders the conv"):
        encode_conversation(stories, conversation, last_only, HUGE)
    generation = GENERATION_CHATML.replace(
        "{%- if message.reasoning_content -%}", "{%- if message.reasoning_content and loop.last -%}"
    )
    with pytest.raises(ChatTemplateError, match=r"turns\[2\]: .* leaves the assistant turn's reas"):
        encode_conversation(stories, conversation, generation, HUGE)


def test_a_template_raising_is_an_error_naming_the_setting(stories):
    conversation = Conversation((Turn("user", "hi"), Turn("assistant", "hello")))
    with pytest.raises(
        ChatTemplateError, match=r"data.chat_template\) fails.*roles must alternate"
    ):
        encode_conversation(
            stories, conversation, "{{ raise_exception('roles must alternate') }}", 64
        )


def test_a_model_without_a_template_and_no_setting_is_refused_naming_both(stories):
    with pytest.raises(ChatTemplateError) as error:
        resolve_chat_template(stories, None, REPO, "assets/models/stories260K")
    assert str(error.value).startswith(
        "model.name = 'assets/models/stories260K': its tokenizer has no chat template to render "
        "conversations; name one with data.chat_template"
    )


def test_the_setting_reads_a_jinja_file_or_a_tokenizer_folder(stories, tmp_path: Path):
    assert resolve_chat_template(stories, TEMPLATE_FILE, REPO, "m") == CHATML
    stories.save_pretrained(tmp_path / "plain")
    with pytest.raises(ChatTemplateError, match="the tokenizer there has no chat template"):
        load_chat_template(str(tmp_path / "plain"), REPO)
    templated = AutoTokenizer.from_pretrained(MODEL_DIR)
    templated.chat_template = PLAIN_CHATML
    templated.save_pretrained(tmp_path / "chat")
    assert load_chat_template("chat", tmp_path) == PLAIN_CHATML
    with pytest.raises(ChatTemplateError, match=r"data.chat_template = 'nope.jinja': no file at"):
        load_chat_template("nope.jinja", tmp_path)


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerBase:
    if not SMOLLM2.is_file():
        pytest.skip(f"SmolLM2 is not fetched (no {SMOLLM2}: `make smollm2`)")
    return AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@pytest.mark.slow
def test_smollm2_labels_match_the_reference_with_its_own_and_the_bundled_template(smollm2):
    own = resolve_chat_template(smollm2, None, REPO, str(SMOLLM2))
    plain = [c for c in _conversations() if not c.tools]  # its template shows no tools
    _assert_labels_match_reference(smollm2, [c for c in plain if "tool" not in _roles(c)], own)
    _assert_labels_match_reference(smollm2, _conversations(), CHATML)
    with pytest.raises(ChatTemplateError, match="tool call 'search_recipes' out of its labelled"):
        encode_conversation(smollm2, bundled(next(iter(BUNDLED)))[0].conversation, own, HUGE)  # type: ignore[arg-type]


def _roles(conversation: Conversation) -> set[str]:
    return {turn.role for turn in conversation.turns}
