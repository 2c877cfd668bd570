"""fisher-target on the real stories260K: target states by hand, and select_from_file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from steps.data.ingest import IngestConfig
from steps.modeling import ModelConfig, load_model, load_tokenizer, model_source
from steps.selection.embedding.embed import EmbedConfig, FeaturesRef, load_pool
from steps.selection.record import read_selection
from steps.selection.select import SelectConfig, select_from_file
from steps.selection.target_sample import embed_targets
from tests.conftest import MODEL_DIR, write_jsonl

MODEL = ModelConfig(name=str(MODEL_DIR))
pytestmark = pytest.mark.slow


def test_target_states_are_every_prompt_position_after_the_first(tmp_path, gsm8k_test):
    prompts = [r["question"] for r in gsm8k_test[:4]]
    embed = EmbedConfig(batch_tokens=2048, sketch_dim=0)
    pool = load_pool(embed_targets(prompts, MODEL, embed, tmp_path, "cpu", "fp32"))
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, "cpu").eval()
    for i, prompt in enumerate(prompts):
        text = MODEL.prompt_template.format(prompt=prompt)
        ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
        with torch.inference_mode():
            x = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 1:]
        x = x.double().numpy()  # positions 1..T-1: the last predicts the response's start
        assert pool.n_tokens[i] == ids.shape[1] - 1
        f = pool.factors[pool.offsets[i] : pool.offsets[i + 1]].astype(np.float64)
        want = x.T @ x
        np.testing.assert_allclose(f.T @ f, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_select_from_file_with_a_target_sample(tmp_path, gsm8k_train, gsm8k_test):
    pool_path = write_jsonl(tmp_path / "train.jsonl", gsm8k_train[:24])
    prompts = [{"question": r["question"]} for r in gsm8k_test[:6]]  # no answers needed
    target_path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    config = SelectConfig(selector="fisher-target", budget=5, target=str(target_path))
    ref = select_from_file(
        IngestConfig(source=str(pool_path)),
        model_source(MODEL),
        EmbedConfig(batch_tokens=2048, sketch_dim=16),  # sketched: targets get the same P
        config,
        tmp_path / "work",
        device="cpu",
        precision="fp32",
        project_dir=tmp_path,
    )
    record = read_selection(Path(ref.selection_path), "test")
    assert ref.examples == 5 and len(set(record.rows)) == 5
    meta = json.loads((tmp_path / "work" / "target_features" / "meta.json").read_text())
    assert load_pool(FeaturesRef(**meta)).d == 16
