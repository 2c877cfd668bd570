"""The embedding pass in 2 CPU processes (accelerate launch, gloo) against one process."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from steps.hashing import file_md5
from steps.modeling import ModelConfig
from steps.selection.embedding.embed import FILES, EmbedConfig, FeaturesRef, embed_pool, load_pool
from steps.selection.embedding.multiprocess import run_workers
from steps.selection.selectors import select
from tests.conftest import MODEL_DIR
from tests.model.conftest import write_train_table

MODEL = ModelConfig(name=str(MODEL_DIR))
# 40 examples in 5 chunks: worker 0 computes chunks 0, 2, 4 and worker 1 chunks 1, 3.
CONFIG = EmbedConfig(batch_tokens=1024, chunk_examples=8)
TWO = CONFIG.model_copy(update={"num_processes": 2})
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_table(tmp_path_factory, gsm8k_train) -> str:
    path, _ = write_train_table(gsm8k_train[:40], tmp_path_factory.mktemp("pool") / "pool.parquet")
    return path


@pytest.fixture(scope="module")
def one_process(pool_table: str, tmp_path_factory) -> FeaturesRef:
    """The reference pass, in this process on one torch thread like each worker (torchrun
    gives every worker OMP_NUM_THREADS=1), so that both run the same kernels."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_dir = tmp_path_factory.mktemp("one") / "features"
        return embed_pool(pool_table, MODEL, CONFIG, out_dir, "cpu", "fp32")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_worker_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def files(ref: FeaturesRef) -> dict[str, bytes]:
    return {name: (Path(ref.features_dir) / f"{name}.npy").read_bytes() for name in FILES}


def manifest(ref: FeaturesRef) -> dict:
    return json.loads((Path(ref.features_dir) / "manifest.json").read_text())


def test_two_processes_write_the_same_pool_and_fisher_picks_the_same(
    pool_table: str, one_process: FeaturesRef, tmp_path: Path, one_worker_thread
):
    two = embed_pool(pool_table, MODEL, TWO, tmp_path / "features", "cpu", "fp32")
    launch = tmp_path / "features" / "launch"
    assert sorted(p.name for p in launch.glob("rank-*.json")) == ["rank-0.json", "rank-1.json"]
    chunks = sorted((tmp_path / "features").glob("chunk-*.npz"))
    assert len(chunks) == 5
    # each worker recorded the md5 of every chunk it wrote: what a later pass checks it by
    assert all(file_md5(p) == p.with_suffix(".md5").read_text() for p in chunks)
    # every per-example statistic, bit for bit: the same chunks, merged in pool order
    assert files(two) == files(one_process)
    assert manifest(two) == manifest(one_process)  # num_processes is not part of it
    same = replace(two, features_dir=one_process.features_dir, tokens_per_second=0.0)
    assert same == replace(one_process, tokens_per_second=0.0)
    assert two.tokens_per_second > 0
    pools = load_pool(one_process), load_pool(two)
    for selector in ("fisher", "fisher-per-token"):
        budget = 10 if selector == "fisher" else int(pools[0].n_tokens.sum()) // 4
        orders = [select(pool, budget, selector).order for pool in pools]
        assert len(orders[0]) > 0
        np.testing.assert_array_equal(orders[0], orders[1])


def test_two_processes_resume_a_one_process_pass_computing_only_the_missing_chunks(
    pool_table: str, one_process: FeaturesRef, tmp_path: Path, one_worker_thread
):
    out_dir = tmp_path / "features"
    shutil.copytree(one_process.features_dir, out_dir)
    lost = [out_dir / "chunk-00001.npz", out_dir / "chunk-00003.npz"]
    for path in [*lost, *(out_dir / f"{name}.npy" for name in FILES)]:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in out_dir.glob("chunk-*.npz")}
    two = embed_pool(pool_table, MODEL, TWO, out_dir, "cpu", "fp32")
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # reused, not redone
    assert all(p.is_file() for p in lost)
    assert files(two) == files(one_process)
    reports = [json.loads(p.read_text()) for p in sorted((out_dir / "launch").glob("rank-*.json"))]
    # one lost chunk each (worker r takes missing[r::2]); 8 examples of ~150 tokens apiece
    assert all(report["tokens"] > 8 * 50 for report in reports)


def test_more_gpu_processes_than_gpus_fail_before_launching(tmp_path: Path):
    import torch

    too_many = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match=f"embed.num_processes={too_many} needs one GPU"):
        run_workers("{}", too_many, "cuda", tmp_path)
    assert not (tmp_path / "launch").exists()


def test_a_failing_worker_raises_in_the_parent_with_the_log_tail(tmp_path: Path):
    with pytest.raises(RuntimeError, match="(?s)exited with code 1.*validation error"):
        run_workers('{"not": "an EmbedJob"}', 2, "cpu", tmp_path)
    assert not list((tmp_path / "launch").glob("rank-*.json"))
