"""The embed pass and FisherSFT on conversations: each conversation's statistics count its
assistant tokens and nothing else (the labels of the brute-force ChatML reference), and
fisher's picks under a token budget equal brute-force greedy log det on those statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from steps.data.conversations import conversation_from_json
from steps.data.ingest import IngestConfig, ingest
from steps.encoding import ChatEncoding
from steps.modeling import IGNORE_INDEX, ModelConfig
from steps.selection.embedding.embed import EmbedConfig, embed_pool, load_pool
from steps.selection.select import SelectConfig, select_subset
from tests.conftest import MODEL_DIR, REPO
from tests.conversation_files import CONVERSATIONS_DIR, brute_force_fit
from tests.unit.test_token_budget import brute_force_token_fill

CHATML = (REPO / "assets" / "chat_templates" / "chatml_tools.jinja").read_text()
FASTCHAT = CONVERSATIONS_DIR / "fastchat_dummy_conversation_20.json"


def test_conversation_statistics_count_assistant_tokens_and_fisher_picks_as_brute_force(
    tmp_path: Path, one_torch_thread
):
    config = IngestConfig(source=str(FASTCHAT), eval_source=str(FASTCHAT))
    train = ingest(config, REPO, tmp_path / "staging").train
    model = ModelConfig(name=str(MODEL_DIR))
    chat = ChatEncoding(template=CHATML, train_on="all_assistant")
    features = embed_pool(
        train.path, model, EmbedConfig(), tmp_path / "features", "cpu", "fp32", chat
    )
    pool = load_pool(features)

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    expected = []
    for text in pd.read_parquet(train.path).conversation:
        fit = brute_force_fit(tokenizer, conversation_from_json(text), CHATML, model.max_length)
        assert fit is not None
        expected.append(sum(label != IGNORE_INDEX for label in fit[2][1:]))  # shifted labels
    assert pool.n_tokens.tolist() == expected

    budget = int(pool.n_tokens.sum()) // 3
    select = SelectConfig(selector="fisher", budget_tokens=budget)
    picked = select_subset(features, train.path, select, tmp_path / "selection")
    record = json.loads(Path(picked.selection_path).read_text())
    assert record["rows"] == brute_force_token_fill(pool, budget, select.ridge)
    assert record["budget_kind"] == "tokens" and 0 < picked.loss_tokens <= budget
