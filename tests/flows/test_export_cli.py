"""`sift export` and `sift select --export` on a real selection of the bundled GSM8K slice: the
three formats read back by `datasets`, TRL and LLaMA-Factory's mapping to the selected rows in
the selection's order; a run id reads the run's logged selection; errors are one line and
write nothing."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset
from mlflow.tracking import MlflowClient
from trl.data_utils import is_conversational
from typer.testing import CliRunner

from flows.cli.main import app
from steps import tracking
from steps.data.conversations import Conversation, Turn, conversation_id
from steps.data.fields import content_id
from steps.hashing import file_md5
from steps.selection.record import SelectionRecord, write_selection
from tests.conftest import ALLOW_REPO_ASSETS, GSM8K_DIR, MODEL_DIR, read_jsonl, write_jsonl
from tests.conversation_files import CONVERSATIONS_DIR, bundled
from tests.llamafactory import as_conversation, read_dataset

runner = CliRunner()
BUDGET = 6


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Path:
    """A project holding 40 GSM8K rows, selected once by `sift select` (the bundled model,
    CPU) and exported as messages while it selects."""
    root = tmp_path_factory.mktemp("export")
    write_jsonl(root / "train.jsonl", read_jsonl(GSM8K_DIR / "train.jsonl", 40))
    args = ["select", "--data", "train.jsonl", "--out", "sel/selection.json",
            "--export", "out/gsm8k.jsonl", "--set", f"model.name={MODEL_DIR}",
            "--set", "model.device=cpu", "--set", f"select.budget={BUDGET}",
            "--set", ALLOW_REPO_ASSETS]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "6 rows of 40 (messages) → " in result.output
    return root


def _export(root: Path, *args: str) -> str:
    result = runner.invoke(app, ["export", "--data", "train.jsonl", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _card(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n")[1])


def _gsm8k_conversations(root: Path) -> list[Conversation]:
    """The selected rows of train.jsonl, by id, in the selection's order."""
    ids = json.loads((root / "sel" / "selection.json").read_text())["train_ids"]
    rows = {content_id(r["question"], r["answer"]): r for r in read_jsonl(root / "train.jsonl", 40)}
    return [
        Conversation((Turn("user", rows[i]["question"]), Turn("assistant", rows[i]["answer"])))
        for i in ids
    ]


def test_select_export_writes_the_picked_rows_as_trl_messages_with_a_card(selected: Path):
    rows = load_dataset("json", data_files=str(selected / "out" / "gsm8k.jsonl"), split="train")
    assert all(is_conversational(row) for row in rows)
    got = [
        Conversation(tuple(Turn(t["role"], t["content"]) for t in row["messages"])) for row in rows
    ]
    assert got == _gsm8k_conversations(selected)  # the selection's rows, in its order

    card = _card(selected / "out" / "gsm8k.jsonl.card.md")
    picked = json.loads((selected / "sel" / "selection.json").read_text())
    assert (card["selector"], card["budget"], card["objective"]) == (
        picked["selector"], BUDGET, picked["final_objective"],
    )  # fmt: skip
    assert (card["selected_rows"], card["pool_rows"]) == (BUDGET, 40)
    assert card["pool_md5"] == file_md5(selected / "train.jsonl")
    assert card["selection_md5"] == file_md5(selected / "sel" / "selection.json")
    assert card["sift_version"] == version("sift")
    text = (selected / "out" / "gsm8k.jsonl.card.md").read_text()
    command = "sift select --data train.jsonl --out sel/selection.json --export out/gsm8k.jsonl"
    assert command in text


def test_sharegpt_and_alpaca_exports_read_back_through_llamafactory(selected, monkeypatch):
    monkeypatch.chdir(selected)
    selection = ["--selection", "sel/selection.json"]
    printed = _export(selected, *selection, "--format", "sharegpt", "--out", "out/gsm8k_sg.json")
    assert "LLaMA-Factory: dataset 'gsm8k_sg' in " in printed
    _export(selected, *selection, "--format", "alpaca", "--out", "out/gsm8k_alpaca.json")

    expected = _gsm8k_conversations(selected)
    for name in ("gsm8k_sg", "gsm8k_alpaca"):
        examples = read_dataset(selected / "out", name)
        assert [e and as_conversation(e) for e in examples] == expected, name
    info = json.loads((selected / "out" / "dataset_info.json").read_text())
    assert info["gsm8k_alpaca"]["columns"] == {
        "prompt": "instruction", "query": "input", "response": "output",
    }  # fmt: skip
    assert info["gsm8k_sg"]["formatting"] == "sharegpt"


def test_a_run_id_exports_the_selection_the_run_logged(selected, monkeypatch, empty_store):
    monkeypatch.chdir(selected)
    uri = empty_store(selected / "mlruns" / "mlflow.db")
    tracking.use_tracking(uri)
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment_id("export", selected)).info.run_id
    client.log_artifact(run_id, str(selected / "sel" / "selection.json"), "selection")
    client.set_tag(run_id, "dvc.train_md5", "a" * 32)
    store = ["--set", f"tracking.tracking_uri={uri}"]

    _export(selected, "--selection", run_id, "--format", "messages", "--out", "out/run.jsonl",
            *store)  # fmt: skip
    out = selected / "out"
    assert (out / "run.jsonl").read_bytes() == (out / "gsm8k.jsonl").read_bytes()
    card = _card(out / "run.jsonl.card.md")
    assert (card["run_id"], card["run_pool_md5"]) == (run_id, "a" * 32)
    assert card["selection"] == f"MLflow run {run_id}"

    args = ["export", "--selection", "0" * 32, "--format", "messages", "--out", "out/x.jsonl",
            "--data", "train.jsonl", *store]  # fmt: skip
    unknown = runner.invoke(app, args)
    assert unknown.exit_code == 2
    assert f"--selection='{'0' * 32}': no such MLflow run" in unknown.output


def test_export_errors_are_one_line_and_write_nothing(selected, monkeypatch, tmp_path):
    monkeypatch.chdir(selected)
    before = sorted((selected / "out").iterdir())
    source_md5 = file_md5(selected / "train.jsonl")
    cases = {
        "format 'csv' is not one of messages, sharegpt, alpaca": ["--format", "csv"],
        f"--out '{tmp_path / 'x.jsonl'}' resolves to": ["--out", str(tmp_path / "x.jsonl")],
        "not in ": ["--set", "data.limit=5"],  # the selection's rows lie beyond the first 5
        "--out train.jsonl lies in the data it is read from": ["--out", "train.jsonl"],
        "--selection 'nope.json': no such file, and not an MLflow run id": ["--selection",
                                                                           "nope.json"],
    }  # fmt: skip
    for message, change in cases.items():
        args = {"--selection": "sel/selection.json", "--format": "messages",
                "--out": "out/bad.jsonl"}  # fmt: skip
        extra = [] if change[0] in args else change
        if change[0] in args:
            args[change[0]] = change[1]
        result = runner.invoke(app, ["export", "--data", "train.jsonl",
                                     *[w for kv in args.items() for w in kv], *extra])  # fmt: skip
        assert result.exit_code == 2, (message, result.output)
        assert result.output.startswith("sift export: ") and message in result.output, message
        assert result.output.count("\n") == 1, result.output
    assert sorted((selected / "out").iterdir()) == before and not (tmp_path / "x.jsonl").exists()
    assert file_md5(selected / "train.jsonl") == source_md5

    refused = runner.invoke(app, ["select", "--data", "train.jsonl", "--out", "sel2/s.json",
                                  "--export", "out/y.jsonl", "--export-format", "csv"])  # fmt: skip
    assert refused.exit_code == 2 and "format 'csv' is not one of" in refused.output
    assert not (selected / "sel2").exists()  # refused before selecting


def test_a_hand_written_selection_of_conversations_exports_to_sharegpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(CONVERSATIONS_DIR / "glaive_toolcall_en_demo_20.json", tmp_path / "g.json")
    conversations = [row.conversation for row in bundled("glaive_toolcall_en_demo_20.json")]
    picked = [conversations[k] for k in (12, 1, 7)]
    ids = [conversation_id(c) for c in picked if c is not None]
    record = SelectionRecord(
        selector="hand", budget=3, ridge=1e-3, feature_space="none", ids=ids, rows=[12, 1, 7],
        train_ids=ids, prior=None, gains=[1.0] * 3, objective=[1.0, 2.0, 3.0],
        final_objective=3.0, loss_tokens=0, design_md5="0" * 32,
    )  # fmt: skip
    write_selection(tmp_path / "hand.json", record)
    result = runner.invoke(app, ["export", "--selection", "hand.json", "--data", "g.json",
                                 "--format", "sharegpt", "--out", "lf/glaive.json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    examples = read_dataset(tmp_path / "lf", "glaive")
    assert [e and as_conversation(e) for e in examples] == picked
    assert _card(tmp_path / "lf" / "glaive.json.card.md")["rows_as_in_source"] is True


def test_sift_select_on_conversations_exports_the_picked_conversations(tmp_path, monkeypatch):
    """`sift select --export` on a sharegpt file encoded with a chat template file
    (data.chat_template names the template that encodes conversations; the export must not
    read it as a prompt renderer): the picked conversations go out as TRL messages."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(CONVERSATIONS_DIR / "glaive_toolcall_en_demo_20.json", tmp_path / "g.json")
    template = CONVERSATIONS_DIR.parent.parent / "chat_templates" / "chatml_tools.jinja"
    result = runner.invoke(app, [
        "select", "--data", "g.json", "--out", "sel.json", "--export", "out/g.jsonl",
        "--set", f"model.name={MODEL_DIR}", "--set", "model.device=cpu",
        "--set", "model.max_length=4096", "--set", "data.limit=6", "--set", "select.budget=3",
        "--set", f"data.chat_template={template}", "--set", ALLOW_REPO_ASSETS,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 rows of 6 (messages) → " in result.output
    ids = json.loads((tmp_path / "sel.json").read_text())["train_ids"]
    rows = bundled("glaive_toolcall_en_demo_20.json")[:6]
    by_id = {conversation_id(r.conversation): r.conversation for r in rows if r.conversation}
    exported = load_dataset("json", data_files=str(tmp_path / "out" / "g.jsonl"), split="train")
    assert is_conversational(exported[0]) and len(exported) == 3
    firsts = [row["messages"][0]["content"] for row in exported]
    assert firsts == [by_id[i].turns[0].content for i in ids]
