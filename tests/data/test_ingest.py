from pathlib import Path

import pandas as pd
import pytest

from steps.data.ingest import IngestConfig, IngestError, ingest
from steps.data.sources import source_fingerprint
from tests.conftest import read_jsonl, write_jsonl


def _config(project: Path, **overrides) -> IngestConfig:
    return IngestConfig(
        source=str(project / "raw" / "train.jsonl"),
        eval_source=str(project / "raw" / "test.jsonl"),
        **overrides,
    )


def test_ingest_writes_the_schema_and_is_deterministic(project: Path, tmp_path: Path):
    first = ingest(_config(project), project, tmp_path / "a")
    second = ingest(_config(project), project, tmp_path / "b")
    assert first.train.md5 == second.train.md5 and first.eval.md5 == second.eval.md5
    table = pd.read_parquet(first.train.path)
    assert list(table.columns) == ["id", "prompt", "response", "source", "split"]
    assert first.train.rows == 80 and first.eval.rows == 16
    assert table.id.is_unique and set(table.split) == {"train"}


def test_limits_take_the_first_rows(project: Path, tmp_path: Path):
    result = ingest(_config(project, limit=10, eval_limit=4), project, tmp_path)
    assert (result.train.rows, result.eval.rows) == (10, 4)


def test_other_formats_and_plain_text(project: Path, tmp_path: Path):
    frame = pd.read_json(project / "raw" / "train.jsonl", lines=True)
    frame.to_csv(project / "raw" / "train.csv", index=False)
    frame.to_parquet(project / "raw" / "train.parquet")
    (project / "raw" / "lm.txt").write_text("first document\n\nsecond document\n")
    for name in ("train.csv", "train.parquet"):
        config = _config(project).model_copy(update={"source": str(project / "raw" / name)})
        assert ingest(config, project, tmp_path / name).train.rows == 80
    text = _config(project).model_copy(update={"source": str(project / "raw" / "lm.txt")})
    table = pd.read_parquet(ingest(text, project, tmp_path / "txt").train.path)
    assert list(table.response) == ["first document", "second document"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "answer": "a"}\n{not json}\n', "line 2 is not valid JSON"),
        ('{"q": "x", "a": "y"}\n', r"missing field\(s\) \['question', 'answer'\]"),
        ("", "no records"),
    ],
)
def test_bad_files_get_errors_naming_the_problem(project: Path, tmp_path: Path, content, message):
    (project / "raw" / "train.jsonl").write_text(content)
    with pytest.raises(IngestError, match=message):
        ingest(_config(project), project, tmp_path)


def test_missing_and_unsupported_sources(project: Path, tmp_path: Path):
    with pytest.raises(IngestError, match="not found"):
        ingest(_config(project).model_copy(update={"source": "./nope.jsonl"}), project, tmp_path)
    (project / "raw" / "data.xml").write_text("<a/>")
    bad = _config(project).model_copy(update={"source": str(project / "raw" / "data.xml")})
    with pytest.raises(IngestError, match="unsupported format"):
        ingest(bad, project, tmp_path)


def test_fingerprint_follows_content_not_path(project: Path):
    path = project / "raw" / "train.jsonl"
    before = source_fingerprint(str(path), project)
    write_jsonl(path, [{"question": "changed", "answer": "yes"}])
    assert source_fingerprint(str(path), project) != before
    assert source_fingerprint("org/some-hub-dataset", project) == "hub:org/some-hub-dataset"


def test_same_data_from_another_checkout_is_byte_identical(project: Path, tmp_path: Path):
    other = tmp_path / "other-checkout"
    (other / "raw").mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl"):
        (other / "raw" / name).write_bytes((project / "raw" / name).read_bytes())
    here = ingest(_config(project), project, tmp_path / "a")
    there = ingest(_config(other), other, tmp_path / "b")
    assert (here.train.md5, here.eval.md5) == (there.train.md5, there.eval.md5)
    assert set(pd.read_parquet(here.train.path).source) == {"raw/train.jsonl"}


def test_templates_text_field_and_nulls(project: Path, tmp_path: Path):
    alpaca = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "n": 1},
        {"instruction": "Say hi.", "input": "", "output": "hi", "n": 2},
        {"instruction": "Null output.", "input": "", "output": None, "n": 3},
    ]
    write_jsonl(project / "raw" / "alpaca.jsonl", alpaca)
    config = _config(project).model_copy(
        update={
            "source": str(project / "raw" / "alpaca.jsonl"),
            "eval_source": str(project / "raw" / "alpaca.jsonl"),
            "prompt_field": "{instruction}\n{input}",
            "response_field": "output",
        }
    )
    table = pd.read_parquet(ingest(config, project, tmp_path / "t").train.path)
    assert list(table.prompt) == ["Add the numbers.\n2 and 3", "Say hi.\n", "Null output.\n"]
    assert table.response[1] == "hi" and pd.isna(table.response[2])  # null: the suite's job

    lm = config.model_copy(update={"text_field": "instruction"})
    table = pd.read_parquet(ingest(lm, project, tmp_path / "lm").train.path)
    assert list(table.prompt) == ["", "", ""] and table.response[0] == "Add the numbers."

    bad = config.model_copy(update={"prompt_field": "{instruction} ({n})"})
    with pytest.raises(IngestError, match=r"alpaca\.jsonl line 1: field 'n' .* is int 1"):
        ingest(bad, project, tmp_path / "bad")


def test_the_datasets_loader_reads_a_local_dataset_folder_like_the_files(
    project: Path, tmp_path: Path
):
    """`datasets.load_dataset` (the hub code path) on a local folder: same rows, same ids."""
    hub = _config(project).model_copy(
        update={"source": "raw", "eval_source": "raw", "loader": "datasets"}
    )
    via_datasets = ingest(hub, project, tmp_path / "datasets")
    via_files = ingest(_config(project), project, tmp_path / "files")
    for split in ("train", "eval"):
        left = pd.read_parquet(getattr(via_datasets, split).path)
        right = pd.read_parquet(getattr(via_files, split).path)
        assert list(left.id) == list(right.id) and list(left.response) == list(right.response)


@pytest.mark.parametrize(
    "source", ["../outside.jsonl", "raw/../../outside.jsonl", "/etc/passwd", "link.jsonl"]
)
def test_paths_outside_the_allowed_roots_are_rejected_before_reading(
    project: Path, tmp_path: Path, source: str
):
    (project.parent / "outside.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (project / "link.jsonl").symlink_to(project.parent / "outside.jsonl")
    config = _config(project).model_copy(update={"source": source})
    with pytest.raises(
        IngestError, match=r"data\.source '.*' resolves to .*, outside data\.allowed_roots"
    ):
        ingest(config, project, tmp_path / "staging")
    assert not (tmp_path / "staging").exists()
    allowed = config.model_copy(update={"allowed_roots": (".", str(project.parent))})
    if source != "/etc/passwd":
        assert ingest(allowed, project, tmp_path / "ok").train.rows == 1


def test_a_chat_template_from_a_tokenizer_renders_prompts(project: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from tests.conftest import MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    plain = _config(project).model_copy(update={"chat_template": str(MODEL_DIR)})
    with pytest.raises(IngestError, match=r"data\.chat_template: .* has no chat template"):
        ingest(plain, project, tmp_path / "plain")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    config = plain.model_copy(update={"chat_template": str(tmp_path / "chat-tokenizer")})
    table = pd.read_parquet(ingest(config, project, tmp_path / "chat").train.path)
    first = read_jsonl(project / "raw" / "train.jsonl", 1)[0]
    assert table.prompt[0] == f"<|user|>{first['question']}\n<|assistant|>"
    assert table.response[0] == first["answer"]


def test_other_formats_name_the_row_at_fault(project: Path, tmp_path: Path):
    frame = pd.read_json(project / "raw" / "train.jsonl", lines=True)
    frame.assign(answer=range(7, 7 + len(frame))).to_parquet(project / "raw" / "mixed.parquet")
    (project / "raw" / "bad.csv").write_bytes(b"question,answer\nq,a\nq2,\xff\n")
    (project / "raw" / "list.json").write_text('[{"question": "q", "answer": "a"}, 3]')
    for name, message in (
        ("mixed.parquet", r"mixed\.parquet record 1: field 'answer' .* is int 7"),
        ("bad.csv", r"bad\.csv: not valid UTF-8"),
        ("list.json", r"list\.json: expected a JSON array of objects"),
    ):
        config = _config(project).model_copy(update={"source": str(project / "raw" / name)})
        with pytest.raises(IngestError, match=message):
            ingest(config, project, tmp_path / name)


def test_an_unreachable_hub_dataset_is_a_clear_error(project: Path, tmp_path: Path):
    config = _config(project).model_copy(update={"source": "no-such-org/no-such-dataset"})
    with pytest.raises(IngestError, match=r"datasets\.load_dataset\('no-such-org/no-such-dataset'"):
        ingest(config, project, tmp_path / "hub")
    local = _config(project).model_copy(update={"source": "raw", "loader": "datasets"})
    with pytest.raises(IngestError, match=r"split='validation'.* failed: ValueError: Unknown"):
        ingest(local.model_copy(update={"split": "validation"}), project, tmp_path / "split")
