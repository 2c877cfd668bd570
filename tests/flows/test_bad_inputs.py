"""The bad-input catalogue: each input stops the real flow with an error naming the problem,
and leaves data/, data.dvc, the DVC remote and the model registry exactly as they were.

One project per module holds a validated, versioned good dataset; every case points the
pipeline at its own bad files and compares a snapshot of everything a run could change.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.config import load_config, resolve_paths
from steps.data.ingest import IngestConfig, IngestError, ingest
from steps.data.validate import DataValidationError, ValidateConfig, raise_on_failure, validate
from steps.data.version import VersionConfig, version_data
from steps.hashing import file_md5
from steps.modeling import ModelConfig
from tests.conftest import ALLOW_REPO_ASSETS, GSM8K_DIR, MODEL_DIR, read_jsonl, write_jsonl

pytestmark = pytest.mark.slow
TRAIN = read_jsonl(GSM8K_DIR / "train.jsonl", 40)
TEST = read_jsonl(GSM8K_DIR / "test.jsonl", 12)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _with(row: int, **fields) -> bytes:
    """The good pool with fields of one 0-based row replaced."""
    return _jsonl([{**r, **fields} if i == row else r for i, r in enumerate(TRAIN)])


GOOD_TRAIN, GOOD_TEST = _jsonl(TRAIN), _jsonl(TEST)
FAIL = "validation.on_invalid=fail"
OUTSIDE = "../" * 16 + "etc/passwd"

# (case id, train file name, train bytes, eval bytes, extra --set overrides, error regex);
# train bytes may be a folder instead: {file name: bytes, or a Path the file links to}
CASES = [
    ("missing file", "nope.jsonl", None, GOOD_TEST, [], r"data\.source not found: .*nope\.jsonl"),
    ("empty file", "train.jsonl", b"", GOOD_TEST, [], r"train\.jsonl: no records"),
    ("unsupported format", "train.xml", b"<a/>", GOOD_TEST, [], r"unsupported format '\.xml'"),
    (
        "malformed JSON line",
        "train.jsonl",
        GOOD_TRAIN[:-1] + b"\n{question: 'x'}\n" + GOOD_TRAIN,
        GOOD_TEST,
        [],
        r"train\.jsonl: line 41 is not valid JSON \(Expecting property name enclosed in double",
    ),
    (
        "wrong columns",
        "train.jsonl",
        _jsonl([{"q": r["question"], "a": r["answer"]} for r in TRAIN]),
        GOOD_TEST,
        [],
        r"missing field\(s\) \['question', 'answer'\] \(data\.prompt_field = 'question', "
        r"data\.response_field = 'answer'\); columns present: \['q', 'a'\]",
    ),
    (
        "non-string value",
        "train.jsonl",
        _with(4, answer=42),
        GOOD_TEST,
        [],
        r"train\.jsonl line 5: field 'answer' \(data\.response_field\) is int 42, "
        r"expected a string",
    ),
    (
        "null and empty responses",
        "train.jsonl",
        _jsonl(
            [
                {**r, "answer": None if i == 2 else "" if i == 7 else r["answer"]}
                for i, r in enumerate(TRAIN)
            ]
        ),
        GOOD_TEST,
        [FAIL],
        (
            r"\[train\] expect_column_values_to_not_be_null on column 'response' \(1 rows\); "
            r"raw/null-and-empty-responses/train\.jsonl line 3 \(nan\)",
            r"\[train\] expect_column_value_lengths_to_be_between on column 'response' "
            r"\(1 rows\); raw/null-and-empty-responses/train\.jsonl line 8 \(''\)",
        ),
    ),
    (
        "all duplicates",
        "train.jsonl",
        _jsonl([TRAIN[0]] * 40),
        GOOD_TEST,
        [],
        r"\[train\] expect_column_values_to_be_unique on column 'content_id' \(40 rows\) - exact "
        r"duplicates: the same prompt and response; raw/all-duplicates/train\.jsonl line 1 ",
    ),
    (
        "eval/train leakage",
        "train.jsonl",
        GOOD_TRAIN,
        _jsonl(TEST + TRAIN[5:7]),
        [FAIL],
        r"\[eval\] expect_column_values_to_not_be_in_set on column 'content_id' \(2 rows\) - eval "
        r"examples also in the training pool \(same prompt and response\); "
        r"raw/eval-train-leakage/test\.jsonl line 13 ",
    ),
    (
        "invalid UTF-8 bytes",
        "train.jsonl",
        b"\n".join(
            line.replace(b"Natalia", b"Nat\xffalia") if number == 0 else line
            for number, line in enumerate(GOOD_TRAIN.split(b"\n"))
        ),
        GOOD_TEST,
        [],
        r"train\.jsonl: line 1 is not valid UTF-8 \(byte \d+ of the line: b'\\xffali'\)",
    ),
    (
        "lone surrogate escape",
        "train.jsonl",
        GOOD_TRAIN + b'{"question": "q\\udc80", "answer": "a"}\n',
        GOOD_TEST,
        [],
        r"line 41: field 'question' is not valid UTF-8 \(surrogates not allowed",
    ),
    (
        "control characters",
        "train.jsonl",
        _with(3, answer="a bell\x07 in the answer"),
        GOOD_TEST,
        [FAIL],
        r"\[train\] expect_column_values_to_not_match_regex on column 'response' \(1 rows\); "
        r"raw/control-characters/train\.jsonl line 4 ",
    ),
    (
        "example longer than the context",
        "train.jsonl",
        _with(6, question="many words " * 400),
        GOOD_TEST,
        [FAIL],
        r"\[train\] expect_column_values_to_be_between on column 'prompt_tokens' \(1 rows\); "
        r"raw/example-longer-than-the-context/train\.jsonl line 7 \(\d+\)",
    ),
    (
        "too few rows",
        "train.jsonl",
        _jsonl(TRAIN[:3]),
        GOOD_TEST,
        [],
        r"\[train\] expect_table_row_count_to_be_between; observed 3",
    ),
    (
        "path outside the allowed roots",
        None,
        None,
        GOOD_TEST,
        [f"data.source={OUTSIDE}"],
        r"data\.source '.*etc/passwd' resolves to /etc/passwd, outside data\.allowed_roots",
    ),
    (  # stopped by the flow's first step, sources_fingerprint, which would hash the target
        "data folder holding a link out of the allowed roots",
        "parts",
        {"good.jsonl": GOOD_TRAIN, "zz.txt": Path("/etc/passwd")},
        GOOD_TEST,
        [],
        r"^data\.source '.*/parts/zz\.txt' resolves to /etc/passwd, outside data\.allowed_roots",
    ),
]


@pytest.fixture(scope="module")
def versioned(tmp_path_factory) -> Path:
    """A project whose data/ already holds a validated version, pushed to a local remote."""
    project = tmp_path_factory.mktemp("bad-inputs") / "project"
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    write_jsonl(project / "raw" / "train.jsonl", TRAIN)
    write_jsonl(project / "raw" / "test.jsonl", TEST)
    staged = ingest(
        IngestConfig(source="raw/train.jsonl", eval_source="raw/test.jsonl"),
        project,
        project / ".sift" / "staging",
    )
    report = validate(
        staged,
        ValidateConfig(),
        ModelConfig(name=str(MODEL_DIR)),
        project / ".sift" / "gx",
        project / "data",
    )
    raise_on_failure(report)
    version_data(
        project / "data", project, VersionConfig(remote_url=str(project.parent / "remote"))
    )
    return project


def snapshot(project: Path) -> dict[str, object]:
    """Everything a run may change: data.dvc, data/, the remote, the registry."""
    remote = project.parent / "remote"
    uri = f"sqlite:///{project.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {
        "data.dvc": (project / "data.dvc").read_bytes(),
        "data": {p.name: file_md5(p) for p in sorted((project / "data").iterdir())},
        "remote": sorted(str(p.relative_to(remote)) for p in remote.rglob("*")),
        "registry": [m.name for m in client.search_registered_models()],
    }


def pipeline_config(project: Path, train: str, evaluation: str, *extra: str):
    return resolve_paths(
        load_config(
            None,
            [
                f"data.source={train}",
                f"data.eval_source={evaluation}",
                f"model.name={MODEL_DIR}",
                ALLOW_REPO_ASSETS,
                f"version.remote_url={project.parent / 'remote'}",
                "registry.model_name=sift-bad-inputs",
                f"tracking.tracking_uri=sqlite:///{project.parent / 'mlflow.db'}",
                "eval.suite=none",  # the held-out loss only: benchmarks have their own tests
                *extra,
            ],
        ),
        project,
    )


@pytest.mark.parametrize(
    ("name", "file_name", "train", "evaluation", "extra", "message"),
    CASES,
    ids=[case[0] for case in CASES],
)
def test_bad_input_stops_the_flow_and_changes_nothing(
    prefect_harness, versioned: Path, name, file_name, train, evaluation, extra, message
):
    from flows.pipeline import pipeline

    case_dir = versioned / "raw" / name.replace(" ", "-").replace("/", "-")
    case_dir.mkdir(parents=True, exist_ok=True)
    train_path = case_dir / (file_name or "unused.jsonl")
    if isinstance(train, dict):  # a folder source
        train_path.mkdir()
        for name, content in train.items():
            if isinstance(content, Path):
                (train_path / name).symlink_to(content)
            else:
                (train_path / name).write_bytes(content)
    elif train is not None:
        train_path.write_bytes(train)
    (case_dir / "test.jsonl").write_bytes(evaluation)
    before = snapshot(versioned)
    config = pipeline_config(versioned, str(train_path), str(case_dir / "test.jsonl"), *extra)
    with pytest.raises((IngestError, DataValidationError)) as raised:
        pipeline(config, versioned)
    for pattern in (message,) if isinstance(message, str) else message:
        assert re.search(pattern, str(raised.value)), str(raised.value)
    assert snapshot(versioned) == before
    if isinstance(raised.value, DataValidationError):  # the suite ran: its Data Docs are linked
        from prefect.artifacts import Artifact

        docs = Artifact.get("data-docs")
        assert docs is not None and "FAILED" in str(docs.description)
