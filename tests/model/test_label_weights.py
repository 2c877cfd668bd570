"""embed.token_weight=label on the real stories260K: weights by hand, plain statistics kept."""

from pathlib import Path

import numpy as np
import pytest
import torch

from steps.modeling import (
    IGNORE_INDEX,
    ModelConfig,
    encode_examples,
    load_model,
    load_tokenizer,
    pad_batch,
)
from steps.selection.embedding.embed import FILES, EmbedConfig, embed_pool, load_pool
from steps.selection.selectors import select
from tests.conftest import MODEL_DIR
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, gsm8k_train):
    root = tmp_path_factory.mktemp("label")
    table, _ = write_train_table(gsm8k_train[:12], root / "pool.parquet")
    refs = {
        weight: embed_pool(
            table,
            MODEL,
            EmbedConfig(batch_tokens=2048, sketch_dim=0, token_weight=weight),
            root / weight,
            "cpu",
            "fp32",
        )
        for weight in ("none", "label")
    }
    return gsm8k_train[:12], refs


def test_label_weighting_leaves_the_plain_statistics_as_they_were(embedded):
    _, refs = embedded
    for name in FILES:
        plain = np.load(Path(refs["none"].features_dir) / f"{name}.npy")
        with_label = np.load(Path(refs["label"].features_dir) / f"{name}.npy")
        np.testing.assert_array_equal(with_label, plain)
    assert load_pool(refs["none"]).label_factors is None
    assert refs["label"].token_weight == "label"


def test_label_factors_are_the_grams_of_states_weighted_by_hand(embedded):
    rows, refs = embedded
    pool = load_pool(refs["label"])
    assert pool.label_factors is not None
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, "cpu").eval()
    encoded = encode_examples(
        tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], MODEL
    )
    for i in (0, int(np.argmax(pool.n_tokens))):  # the longest has an eigen-factor (T > d)
        ids = torch.tensor([encoded[i].input_ids])
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        labels = np.array(encoded[i].labels[1:])
        loss = labels != IGNORE_INDEX
        x = out.hidden_states[-1][0, :-1].double().numpy()[loss]
        p = torch.softmax(out.logits[0, :-1].double(), dim=-1).numpy()[loss]
        y = labels[loss]
        w = 1 - 2 * p[np.arange(len(y)), y] + (p**2).sum(axis=1)  # ||p - e_y||^2 by hand
        assert len(w) == pool.n_tokens[i] and ((w >= 0) & (w <= 2)).all()
        f = pool.label_factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
        want = (x * w[:, None]).T @ x
        np.testing.assert_allclose(f.T @ f, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert pool.n_tokens.max() > pool.d


def test_fisher_label_selects_from_the_embedded_pool(embedded):
    _, refs = embedded
    pool = load_pool(refs["label"])
    chosen = select(pool, 400, "fisher-label", token_budget=True)
    assert 0 < pool.n_tokens[chosen.order].sum() <= 400


def test_the_head_on_loss_positions_alone_gives_the_full_forwards_numbers(gsm8k_train):
    """The pass runs the output head at loss positions only; states, losses and label weights
    must be the full forward's, on a padded batch, by the fast path and by the fallback that
    models with a logit transform (softcapping, scaling) take."""
    from steps.selection.embedding.stats import _batch_states

    rows = gsm8k_train[:4]
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, "cpu").eval()
    encoded = encode_examples(
        tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], MODEL
    )
    batch = pad_batch(encoded, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padding is present
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)  # fmt: skip
        fast = _batch_states(model, batch, label_weighted=True)
        model.config.final_logit_softcapping = 30.0  # Llama ignores it: same numbers expected
        fallback = _batch_states(model, batch, label_weighted=True)
        del model.config.final_logit_softcapping
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    want_loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # fmt: skip
    for states, losses, got_mask, weights in (fast, fallback):
        np.testing.assert_array_equal(got_mask.numpy(), mask.numpy())
        np.testing.assert_allclose(states.numpy(), out.hidden_states[-1][:, :-1].numpy(),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(losses.numpy(), want_loss.numpy(), rtol=1e-5, atol=1e-5)
        assert weights is not None and (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    np.testing.assert_allclose(fast[3].numpy(), fallback[3].numpy(), rtol=1e-5, atol=1e-6)
