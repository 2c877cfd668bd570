"""Export of selected conversations (steps/export.py): the bundled conversation files read back
through TRL's conversational format and LLaMA-Factory's dataset_info.json mapping to the same
canonical conversations; rows that a format cannot hold, missing ids and bad destinations are
one-line errors that leave nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from datasets import load_dataset
from transformers import AutoTokenizer
from trl.data_utils import apply_chat_template, is_conversational

from steps.data.batch import Batch
from steps.data.conversation_config import SharegptTags
from steps.data.conversation_formats import ConversationColumns, read_conversation
from steps.data.conversations import Conversation, conversation_id
from steps.data.fields import chat_renderer
from steps.data.ingest import normalise_batch
from steps.data.ingest_config import IngestConfig
from steps.export import ExportError, SelectionSource, export_selection
from steps.selection.record import SelectionRecord
from tests.conftest import GSM8K_DIR, MODEL_DIR, REPO, read_jsonl, write_jsonl
from tests.conversation_files import CONVERSATIONS_DIR, bundled
from tests.llamafactory import GLAIVE_ENTRY, as_conversation, read_dataset, read_entry

GLAIVE = "glaive_toolcall_en_demo_20.json"
REASON = "reason_tool_use_demo_20.jsonl"
FASTCHAT = "fastchat_dummy_conversation_20.json"
# Rows 0, 3, 10 call tools (3: twelve turns), 4 does not; picked out of file order.
GLAIVE_ROWS = [3, 0, 4, 10]


def _conversations(name: str) -> list[Conversation]:
    read = [row.conversation for row in bundled(name)]
    assert all(c is not None for c in read)
    return read  # type: ignore[return-value]  # checked: every bundled row reads


def _selection(ids: list[str]) -> SelectionSource:
    """A hand-written selection of `ids`, as selection.json holds one."""
    n = len(ids)
    record = SelectionRecord(
        selector="hand", budget=n, ridge=1e-3, feature_space="none", ids=ids,
        rows=list(range(n)), train_ids=ids, prior=None, gains=[1.0] * n,
        objective=[float(k + 1) for k in range(n)], final_objective=float(n), loss_tokens=0,
        design_md5="0" * 32,
    )  # fmt: skip
    return SelectionSource(record, "hand-written", "1" * 32)


def _export(tmp_path: Path, source: Path, ids: list[str], fmt: str, out: str, **data) -> Path:
    config = IngestConfig(source=str(source), allowed_roots=(".", str(source.parent)), **data)
    target = tmp_path / out
    export_selection(
        _selection(ids), config, fmt, target, project_dir=tmp_path, command="sift export ..."
    )
    return target


def _messages_conversation(row: dict, place: str) -> Conversation:
    """A row of an exported messages file, read by Sift's own messages reader."""
    columns = ConversationColumns("messages", "messages", None, "tools" if "tools" in row else None)
    read = read_conversation(row, columns, SharegptTags(), place)
    assert read.conversation is not None, read.findings
    return read.conversation


def test_glaive_rows_export_to_messages_that_trl_reads_as_the_same_conversations(tmp_path):
    conversations = _conversations(GLAIVE)
    picked = [conversations[k] for k in GLAIVE_ROWS]
    ids = [conversation_id(c) for c in picked]
    out = _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "messages", "glaive.jsonl")

    rows = load_dataset("json", data_files=str(out), split="train")
    assert len(rows) == len(picked)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # no template of its own
    tokenizer.chat_template = (REPO / "assets/chat_templates/chatml_tools.jinja").read_text()
    for index, (row, expected) in enumerate(zip(rows, picked, strict=True)):
        assert is_conversational(row)  # TRL's test of a conversational dataset
        assert _messages_conversation(row, f"row {index}") == expected  # selection order
        tools = json.loads(row["tools"]) if row["tools"] else None  # as SFTTrainer parses it
        text = apply_chat_template({"messages": row["messages"]}, tokenizer, tools)["text"]
        assert all(turn.content in text for turn in expected.turns)
    assert not (tmp_path / "dataset_info.json").exists()  # TRL needs none


def test_glaive_rows_export_to_sharegpt_as_in_the_source_and_llamafactory_reads_them(tmp_path):
    conversations = _conversations(GLAIVE)
    ids = [conversation_id(conversations[k]) for k in GLAIVE_ROWS]
    out = _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "sharegpt", "glaive.json")

    source = json.loads((CONVERSATIONS_DIR / GLAIVE).read_text())
    assert json.loads(out.read_text()) == [source[k] for k in GLAIVE_ROWS]  # records as read
    entry = json.loads((tmp_path / "dataset_info.json").read_text())["glaive"]
    assert {k: v for k, v in entry.items() if k != "tags"} == GLAIVE_ENTRY | {
        "file_name": "glaive.json"
    }  # LLaMA-Factory's own entry for this data, but the file name
    examples = read_dataset(tmp_path, "glaive")
    assert [as_conversation(e) for e in examples if e] == [conversations[k] for k in GLAIVE_ROWS]
    card = yaml.safe_load(out.with_name("glaive.json.card.md").read_text().split("---\n")[1])
    assert card["rows_as_in_source"] is True and card["pool_rows"] == 20
    assert card["selected_rows"] == 4 and card["selection_md5"] == "1" * 32


def test_the_llamafactory_reader_of_these_tests_reads_glaive_as_sift_does():
    """The check of the tests' own LLaMA-Factory reader (tests/llamafactory.py): LLaMA-Factory's
    entry for glaive read with it gives Sift's conversations of every row."""
    examples = read_entry(CONVERSATIONS_DIR / GLAIVE, GLAIVE_ENTRY)
    assert [as_conversation(e) for e in examples if e] == _conversations(GLAIVE)


def _without_reasoning(tmp_path: Path) -> Path:
    """reason_tool_use's rows with their reasoning parts left out: tool calls, parallel calls,
    tool results and a system prompt that sharegpt can hold."""
    path = tmp_path / "data" / "tool_use.jsonl"
    path.parent.mkdir()
    lines = []
    for line in (CONVERSATIONS_DIR / REASON).read_text().splitlines():
        record = json.loads(line)
        for turn in record["messages"]:
            turn["content"] = [p for p in turn["content"] if p["type"] != "reasoning"]
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_messages_rows_export_to_sharegpt_with_system_tools_and_parallel_calls(tmp_path):
    source = _without_reasoning(tmp_path)
    read = [read_conversation(json.loads(line), ConversationColumns(
        "messages", "messages", None, "tools"), SharegptTags(), "x").conversation
        for line in source.read_text().splitlines()]  # fmt: skip
    picked = [read[k] for k in (2, 7, 0, 11)]  # 2: parallel calls; 7 ends on one; 0: none
    assert all(c is not None for c in picked)
    ids = [conversation_id(c) for c in picked if c is not None]
    out = _export(tmp_path, source, ids, "sharegpt", "tool_use.json")

    entry = json.loads((tmp_path / "dataset_info.json").read_text())["tool_use"]
    assert entry["columns"] == {"messages": "conversations", "system": "system", "tools": "tools"}
    examples = read_dataset(tmp_path, "tool_use")
    assert all(e is not None for e in examples)  # none that LLaMA-Factory would skip
    assert [as_conversation(e) for e in examples if e] == picked
    assert json.loads(out.read_text())[0]["conversations"][0]["from"] == "human"


def test_typed_content_parts_are_written_as_strings_and_round_trip(tmp_path):
    conversations = _conversations(REASON)
    picked = [conversations[k] for k in (1, 5)]  # reasoning, tool calls, typed parts
    out = _export(
        tmp_path, CONVERSATIONS_DIR / REASON, [conversation_id(c) for c in picked], "messages",
        "reason.jsonl",
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(isinstance(t["content"], str) for row in rows for t in row["messages"])
    assert [_messages_conversation(row, "r") for row in rows] == picked
    assert any("reasoning_content" in t for t in rows[0]["messages"])


def test_a_reasoning_turn_has_no_sharegpt_form_and_nothing_is_written(tmp_path):
    picked = _conversations(REASON)[1]
    with pytest.raises(ExportError, match=r"reason_tool_use_demo_20\.jsonl line 2 .*: turn 1: "
                       r"reasoning has no sharegpt form; export as messages"):  # fmt: skip
        _export(tmp_path, CONVERSATIONS_DIR / REASON, [conversation_id(picked)], "sharegpt",
                "r.json")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_alpaca_refuses_a_multi_turn_conversation_naming_the_row(tmp_path):
    ids = [conversation_id(c) for c in _conversations(GLAIVE)[:2]]
    with pytest.raises(ExportError) as error:
        _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "alpaca", "g.json")
    assert str(error.value).startswith(f"{CONVERSATIONS_DIR / GLAIVE} record 1 (id {ids[0]}): ")
    assert "this row has 8 turns" in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_two_turn_chats_export_to_alpaca_by_their_own_ids(tmp_path):
    """FastChat's rows carry an `id` column: the selection names them by it (data.id_field
    auto), and LLaMA-Factory reads its alpaca entry back to the same conversations."""
    records = json.loads((CONVERSATIONS_DIR / FASTCHAT).read_text())
    two_turns = [k for k, r in enumerate(records) if len(r["conversations"]) == 2][:3]
    ids = [records[k]["id"] for k in reversed(two_turns)]
    _export(tmp_path, CONVERSATIONS_DIR / FASTCHAT, ids, "alpaca", "identity.json")

    conversations = _conversations(FASTCHAT)
    examples = read_dataset(tmp_path, "identity")
    assert [as_conversation(e) for e in examples if e] == [
        conversations[k] for k in reversed(two_turns)
    ]


def test_missing_ids_are_counted_and_named_and_nothing_is_written(tmp_path):
    known = conversation_id(_conversations(GLAIVE)[0])
    ids = [known, *(f"{k:016x}" for k in range(7))]
    with pytest.raises(ExportError) as error:
        _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "messages", "g.jsonl")
    message = str(error.value)
    assert message.startswith("7 of the selection's 8 ids are not in ")
    assert "(0000000000000000, 0000000000000001, 0000000000000002, 0000000000000003, " in message
    assert "0000000000000004, ...)" in message and "data.id_field" in message
    assert list(tmp_path.iterdir()) == []


def test_a_destination_outside_the_roots_or_an_unknown_format_is_refused(tmp_path):
    ids = [conversation_id(_conversations(GLAIVE)[0])]
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere.jsonl"
    config = IngestConfig(source=str(CONVERSATIONS_DIR / GLAIVE), allowed_roots=(".",))
    with pytest.raises(ExportError, match=r"^--out '.*-elsewhere\.jsonl' resolves to .*, outside "
                       r"data\.allowed_roots"):  # fmt: skip
        export_selection(_selection(ids), config, "messages", outside, project_dir=tmp_path,
                         command="c")  # fmt: skip
    with pytest.raises(ExportError, match=r"^format 'openai' is not one of messages, sharegpt, "):
        _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "openai", "g.jsonl")
    assert not outside.exists() and list(tmp_path.iterdir()) == []


def test_dataset_info_keeps_other_datasets_and_a_broken_one_stops_the_export(tmp_path):
    ids = [conversation_id(_conversations(GLAIVE)[0])]
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "sharegpt", "g.json")
    assert list(json.loads(info.read_text())) == ["mine", "g"]

    info.write_text("{not json")
    with pytest.raises(ExportError, match=r"dataset_info\.json: not valid JSON"):
        _export(tmp_path, CONVERSATIONS_DIR / GLAIVE, ids, "sharegpt", "h.json")
    assert not (tmp_path / "h.json").exists() and not (tmp_path / "h.json.card.md").exists()


def test_chat_rendered_ids_name_rows_whose_prompts_go_out_unrendered(tmp_path):
    """With data.chat_template, ingest hashes the rendered prompt: export finds rows by those
    ids, and writes the prompt as the source has it (the trainer renders it its own way)."""
    template_dir = tmp_path / "chat_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.chat_template = (REPO / "assets/chat_templates/chatml_tools.jinja").read_text()
    tokenizer.save_pretrained(template_dir)
    source = tmp_path / "train.jsonl"
    write_jsonl(source, read_jsonl(GSM8K_DIR / "train.jsonl", 12))
    config = IngestConfig(source=str(source), chat_template=str(template_dir))
    rows = json.loads("[" + ",".join(source.read_text().splitlines()) + "]")
    batch = Batch(pd.DataFrame(rows), [f"line {k + 1}" for k in range(len(rows))])
    render = chat_renderer(config.chat_template)  # as ingest's stream_table renders
    frame = normalise_batch(batch, config, "train.jsonl", "train", render)
    assert frame["prompt"][0] != rows[0]["question"]  # rendered before hashing
    picked = [frame["id"][k] for k in (7, 2)]

    export_selection(_selection(picked), config, "messages", tmp_path / "out.jsonl",
                     project_dir=tmp_path, command="c")  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in written] == [rows[7]["question"],
                                                              rows[2]["question"]]  # fmt: skip
    with pytest.raises(ExportError, match=r"^2 of the selection's 2 ids are not in"):
        plain = IngestConfig(source=str(source))  # no template: other hashes
        export_selection(_selection(picked), plain, "messages", tmp_path / "o2.jsonl",
                         project_dir=tmp_path, command="c")  # fmt: skip
