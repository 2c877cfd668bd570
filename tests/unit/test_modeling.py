import pytest

from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    encode_example,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    resolve_device,
)
from tests.conftest import MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name=str(MODEL_DIR)))


def test_prompt_tokens_carry_no_loss_and_response_ends_with_eos(tokenizer):
    encoded = encode_example(tokenizer, "What is 2+2?", "4", "Q: {prompt}\nA: ", 64)
    prompt_len = len(tokenizer("Q: What is 2+2?\nA: ")["input_ids"])
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.input_ids[prompt_len:]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.n_loss_tokens == len(encoded.input_ids) - prompt_len


def test_long_examples_are_cut_to_max_length(tokenizer):
    encoded = encode_example(tokenizer, "x", "word " * 200, "{prompt}", 32)
    assert len(encoded.input_ids) == len(encoded.labels) == 32


def test_padding_is_masked(tokenizer):
    a = encode_example(tokenizer, "a", "b", "{prompt}", 32)
    b = encode_example(tokenizer, "a longer prompt", "and a longer answer", "{prompt}", 32)
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
