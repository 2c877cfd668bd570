"""The whole flow on conversations: the bundled glaive slice (ShareGPT with tools) as the
pool, FastChat's chats as the eval split, rendered with the bundled ChatML template; real
Prefect, GX, DVC and MLflow, one run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from flows.config import load_config, resolve_paths
from steps.data.conversation_ingest import CONVERSATION_SCHEMA
from steps.data.conversations import conversation_from_json
from steps.encoding import ChatEncoding, encode_table
from steps.modeling import IGNORE_INDEX
from tests.conftest import MODEL_DIR, REPO, small_run_overrides
from tests.conversation_files import CONVERSATIONS_DIR, brute_force_fit
from tests.flows.pipeline_driver import task_states

pytestmark = pytest.mark.slow
TEMPLATE = REPO / "assets" / "chat_templates" / "chatml_tools.jinja"
# stories260K's tokenizer spells ChatML out in single characters: 1024 tokens keep 17 of the
# 20 glaive conversations (some cut to their first exchanges); records 5, 7 and 14 have no
# whole assistant turn within it.
MAX_LENGTH = 1024


def test_a_conversation_run_trains_on_assistant_turns_and_registers_a_version(
    prefect_harness, project: Path
):
    overrides = small_run_overrides(
        project,
        remote=project.parent / "remote",
        model_name="sift-chat",
        tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}",
        budget="0.5",
    )
    config = resolve_paths(
        load_config(
            None,
            [
                *overrides,
                f"data.source={CONVERSATIONS_DIR / 'glaive_toolcall_en_demo_20.json'}",
                f"data.eval_source={CONVERSATIONS_DIR / 'fastchat_dummy_conversation_20.json'}",
                f"data.chat_template={TEMPLATE}",
                f"model.max_length={MAX_LENGTH}",
                "validation.max_quarantine_fraction=0.2",
            ],
        ),
        project,
    )
    from flows.pipeline import pipeline

    state = pipeline(config, project, return_state=True)
    result = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert all(states[name] == {"Completed"} for name in ("embed", "select", "finetune")), states
    assert result.model_version == "1" and result.promoted
    assert math.isfinite(result.eval_loss_base) and math.isfinite(result.eval_loss_finetuned)
    assert result.eval_loss_finetuned < result.eval_loss_base

    # quarantined with their reasons; the rest published as conversations
    assert (result.pool_examples, result.quarantined) == (17, 3)
    quarantine = pd.read_parquet(project / "data" / "quarantine.parquet")
    assert all(r.startswith("conversation_too_long (the first") for r in quarantine.reason)
    train = pd.read_parquet(project / "data" / "train.parquet")
    assert list(train.columns) == CONVERSATION_SCHEMA and len(train) == 17

    # what the run trained on: labels exactly on the assistant replies (the brute-force
    # reference), and the selection's loss tokens are those of the picked conversations
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    chat = ChatEncoding(template=TEMPLATE.read_text(), train_on="all_assistant")
    encoded = encode_table(tokenizer, train, config.model, chat)
    loss_tokens = {}
    for row, text, example in zip(train.id, train.conversation, encoded, strict=True):
        fit = brute_force_fit(tokenizer, conversation_from_json(text), chat.template, MAX_LENGTH)
        assert fit is not None and (example.input_ids, example.labels) == (fit[1], fit[2])
        loss_tokens[row] = sum(label != IGNORE_INDEX for label in example.labels[1:])
    selection = json.loads(
        next((project / ".sift" / "selections").glob("*/selection.json")).read_text()
    )
    assert len(selection["ids"]) == result.selected_examples == 8  # half of 17, rounded
    assert result.selected_tokens == sum(loss_tokens[i] for i in selection["ids"])
