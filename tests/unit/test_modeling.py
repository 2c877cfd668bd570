import pytest

from steps.hardware import resolve_device
from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    encode_example,
    encode_examples,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    prompt_shape,
)
from tests.conftest import MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name=str(MODEL_DIR)))


def _template(tokenizer, template: str):
    return prompt_shape(tokenizer, ModelConfig(name=str(MODEL_DIR), prompt_template=template))


def test_prompt_tokens_carry_no_loss_and_response_ends_with_eos(tokenizer):
    shape = _template(tokenizer, "Q: {prompt}\nA: ")
    encoded = encode_example(tokenizer, "What is 2+2?", "4", shape, 64)
    prompt_len = len(tokenizer("Q: What is 2+2?\nA: ")["input_ids"])
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.input_ids[prompt_len:]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.n_loss_tokens == len(encoded.input_ids) - prompt_len


def test_long_examples_are_cut_to_max_length(tokenizer):
    encoded = encode_example(tokenizer, "x", "word " * 200, _template(tokenizer, "{prompt}"), 32)
    assert len(encoded.input_ids) == len(encoded.labels) == 32


def test_padding_is_masked(tokenizer):
    shape = _template(tokenizer, "{prompt}")
    a = encode_example(tokenizer, "a", "b", shape, 32)
    b = encode_example(tokenizer, "a longer prompt", "and a longer answer", shape, 32)
    batch = pad_batch([a, b], tokenizer.pad_token_id)
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids) :] == IGNORE_INDEX).all()


def test_length_sorted_batches_cover_all_and_respect_the_token_bound():
    lengths = [5, 100, 7, 60, 3, 100, 40]
    batches = length_sorted_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 128


def test_asking_for_cuda_without_one_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="model.device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


# A chat template of the ChatML kind: each turn closed by an end-of-turn token that is not
# the tokenizer's EOS, then a newline (SmolLM2's closes turns with "<|im_end|>\n").
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """stories260K's tokenizer with an end-of-turn token and CHAT_TEMPLATE, as a folder."""
    tokenizer = load_tokenizer(ModelConfig(name=str(MODEL_DIR)))
    tokenizer.add_tokens(["<|end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def test_the_template_format_is_the_prompt_template_then_response_then_eos(tokenizer):
    config = ModelConfig(name=str(MODEL_DIR))
    [encoded] = encode_examples(tokenizer, ["What is 2+2?"], ["4"], config)
    prompt_ids = tokenizer("Question: What is 2+2?\nAnswer: ")["input_ids"]
    response_ids = tokenizer("4", add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id  # the tokenizer's own special tokens
    assert encoded.input_ids == [*prompt_ids, *response_ids, tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + [*response_ids, 2]


def test_the_chat_format_shows_a_user_turn_and_ends_the_response_with_the_end_of_turn(
    chat_model_dir,
):
    config = ModelConfig(name=str(chat_model_dir), prompt_format="chat")
    tokenizer = load_tokenizer(config)
    shape = prompt_shape(tokenizer, config)
    assert shape.text("What is 2+2?") == "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    # "<|end|>\n" closes an assistant turn: its token, not EOS (2), ends every response.
    assert shape.end_ids == shape.stop_ids == (512,)
    assert tokenizer.convert_ids_to_tokens(512) == "<|end|>"
    [encoded] = encode_examples(tokenizer, ["What is 2+2?"], ["4"], config)
    # "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n" in stories260K's 512 pieces, with no
    # BOS (1): the chat template writes the special tokens it wants.
    prompt_ids = [410, 504, 506, 425, 419, 285, 506, 505, 13, 448, 415, 294, 410, 293, 410,
                  479, 496, 479, 450, 512, 13, 504, 506, 412, 419, 419, 293, 413, 303, 413,
                  506, 505, 13]  # fmt: skip
    assert encoded.input_ids == [*prompt_ids, 410, 484, 512]  # "▁", "4", "<|end|>"
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + [410, 484, 512]
    assert encoded.n_loss_tokens == 3


def test_the_chat_format_needs_a_chat_template(tokenizer):
    config = ModelConfig(name=str(MODEL_DIR), prompt_format="chat")
    with pytest.raises(ValueError, match=r"model\.prompt_format=chat: the tokenizer of .*"
                       r"stories260K' has no chat template"):  # fmt: skip
        prompt_shape(tokenizer, config)


def test_a_chat_template_that_writes_nothing_after_the_reply_is_refused(chat_model_dir):
    config = ModelConfig(name=str(chat_model_dir), prompt_format="chat")
    tokenizer = load_tokenizer(config)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    tokenizer.chat_template += "{% endfor %}"  # the reply's newline is all that follows it
    with pytest.raises(ValueError, match="writes nothing after the assistant's reply"):
        prompt_shape(tokenizer, config)


def test_a_prompt_template_with_the_chat_format_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"model\.prompt_template applies to "
                       r"model\.prompt_format=template only"):  # fmt: skip
        ModelConfig(prompt_format="chat", prompt_template="Q: {prompt}\nA: ")
