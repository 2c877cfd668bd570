"""Caches that are always right: a task's key covers the step code it runs, the device and
the precision, and nothing it does not run.

The edit tests run the real pipeline in a separate process over a copy of steps/ and flows/
(PYTHONPATH first), edit one file of the copy, and run it again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect import flow

from flows.tasks import RunContext, embed_task
from steps.data.conversation_config import TrainOn
from steps.data.ingest import IngestConfig, ingest
from steps.encoding import ChatEncoding
from steps.modeling import ModelConfig, model_source
from steps.selection.embedding.embed import EmbedConfig, feature_space, load_pool
from tests.conftest import MODEL_DIR, REPO, small_run_overrides

pytestmark = pytest.mark.slow
TRAIN_ON: tuple[TrainOn, ...] = ("all_assistant", "last_assistant")
DRIVER = REPO / "tests" / "flows" / "pipeline_driver.py"
EXPENSIVE = ("ingest", "embed", "select", "finetune", "evaluate")


@pytest.fixture(scope="module")
def copy(tmp_path_factory, gsm8k_train, gsm8k_test) -> Path:
    """A copy of the code, and a user project beside it, as a fresh checkout would have."""
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("cache-copy")
    for package in ("steps", "flows"):
        shutil.copytree(REPO / package, root / "code" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    project = root / "project"
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    write_jsonl(project / "raw" / "train.jsonl", gsm8k_train[:48])
    write_jsonl(project / "raw" / "test.jsonl", gsm8k_test[:8])
    return root


def _run(root: Path) -> dict:
    from prefect.settings import PREFECT_API_URL

    project = root / "project"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(root / "code"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # The session's Prefect API (the harness): each run would start and migrate an ephemeral
    # server of its own otherwise. Task caches are not in the API: they are the result files
    # under the project's .sift/prefect (pipeline_driver's configure_environment).
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    overrides = small_run_overrides(
        project,
        remote=root / "remote",
        model_name="sift-cache-test",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        budget="8",
    )
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(project), *overrides],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _chunks(root: Path) -> dict[Path, int]:
    """Every embed chunk on disk → its modification time (ns)."""
    features = root / "project" / ".sift" / "features"
    return {path: path.stat().st_mtime_ns for path in features.glob("*/chunk-*.npz")}


def _edit(root: Path, module: str) -> None:
    """A real edit to the copy: one more line of code (behaviour unchanged)."""
    path = root / "code" / module
    path.write_text(path.read_text() + "\nEDITED_BY_TEST = True\n")


def test_a_registry_edit_serves_embed_select_and_finetune_from_cache_an_embed_edit_re_embeds(
    prefect_harness, copy: Path
):
    first = _run(copy)
    assert all(first["states"][name] == ["Completed"] for name in EXPENSIVE), first["states"]
    chunks_before = _chunks(copy)
    assert chunks_before

    _edit(copy, "steps/registry/register.py")
    after_registry_edit = _run(copy)
    states = after_registry_edit["states"]
    assert all(states[name] == ["Cached"] for name in EXPENSIVE), states
    assert after_registry_edit["eval_loss"] == first["eval_loss"]
    assert _chunks(copy) == chunks_before  # not one chunk rewritten

    _edit(copy, "steps/selection/embedding/embed.py")
    after_embed_edit = _run(copy)
    states = after_embed_edit["states"]
    assert states["embed"] == ["Completed"] and states["select"] == ["Completed"], states
    assert states["ingest"] == ["Cached"], states
    chunks_after = _chunks(copy)
    new_chunks = set(chunks_after) - set(chunks_before)
    assert new_chunks, "the edited embed code wrote no chunks of its own"
    assert all(chunks_after[path] > max(chunks_before.values()) for path in new_chunks)
    assert all(chunks_after[path] == chunks_before[path] for path in chunks_before)
    # the same statistics from the same weights: the same picks, so the same trained loss
    assert after_embed_edit["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)


@flow
def _embed_twice(table, model, config: EmbedConfig, contexts: list[RunContext]):
    return [embed_task(table=table, model=model, config=config, context=c) for c in contexts]


def test_a_cpu_fp32_pass_and_a_bf16_pass_never_share_chunks_or_a_feature_space(
    prefect_harness, project: Path, tmp_path: Path
):
    staged = ingest(
        IngestConfig(
            source=str(project / "raw" / "train.jsonl"),
            eval_source=str(project / "raw" / "test.jsonl"),
            limit=24,
        ),
        project,
        tmp_path / "staging",
    )
    model = model_source(ModelConfig(name=str(MODEL_DIR)))
    config = EmbedConfig(chunk_examples=8)
    contexts = [
        RunContext(project, tmp_path / "state", "cpu", precision, run_id=f"run-{precision}")
        for precision in ("fp32", "bf16")
    ]
    fp32, bf16 = _embed_twice(staged.train, model, config, contexts)

    assert fp32.features_dir != bf16.features_dir
    fp32_chunks = {p.name for p in Path(fp32.features_dir).glob("chunk-*.npz")}
    assert fp32_chunks == {f"chunk-{n:05d}.npz" for n in range(3)}
    for ref, precision in ((fp32, "fp32"), (bf16, "bf16")):
        manifest = json.loads((Path(ref.features_dir) / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["device"] == "cpu"
    # bf16 really ran: its statistics differ from fp32's, a little
    a, b = load_pool(fp32).pooled, load_pool(bf16).pooled  # mean states: no sign ambiguity
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    spaces = {feature_space(ref, model.fingerprint, config) for ref in (fp32, bf16)}
    assert len(spaces) == 2


@flow
def _embed_chats(table, model, config: EmbedConfig, context: RunContext, chats: list):
    return [
        embed_task(table=table, model=model, config=config, context=context, chat=chat)
        for chat in chats
    ]


def test_the_chat_encoding_keys_the_embed_cache_of_a_conversation_pool(
    prefect_harness, tmp_path: Path
):
    source = REPO / "assets" / "data" / "conversations" / "fastchat_dummy_conversation_20.json"
    staged = ingest(IngestConfig(source=str(source), eval_source=str(source)), REPO, tmp_path)
    template = (REPO / "assets" / "chat_templates" / "chatml_tools.jinja").read_text()
    every, last = (ChatEncoding(template=template, train_on=on) for on in TRAIN_ON)
    context = RunContext(REPO, tmp_path / "state", "cpu", "fp32", run_id="run-chat")
    model = model_source(ModelConfig(name=str(MODEL_DIR)))
    refs = _embed_chats(staged.train, model, EmbedConfig(), context, [every, last, every])
    assert refs[0].features_dir != refs[1].features_dir  # train_on changes the labels
    assert refs[2] == refs[0]  # the same encoding: the same folder, from the cache
    assert load_pool(refs[1]).n_tokens.sum() < load_pool(refs[0]).n_tokens.sum()
