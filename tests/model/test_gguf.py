"""GGUF checkpoints as base models (steps/gguf.py): the bundled stories260K written as GGUF,
converted once to a folder under .sift/gguf/, loaded with the folder model's logits; a bad
file fails naming itself and its setting before anything is read."""

import json
from pathlib import Path

import pytest
import torch

from flows.config import check_paths, load_config, resolve_paths
from steps.gguf import RECORD, GgufError
from steps.hashing import file_md5
from steps.modeling import ModelConfig, load_model, load_tokenizer, model_source
from steps.paths import PathOutsideRoots
from tests.conftest import MODEL_DIR
from tests.gguf_files import write_gguf

pytestmark = pytest.mark.slow  # real (tiny) model loads and conversions: ~1 s each

TEXTS = [
    "Once upon a time, there was a little girl named Lily. She liked to play outside.",
    "Question: Tom has 3 apples and eats one. How many are left?\nAnswer: 2",
]
# Q8_0 rounds each block of 32 weights to int8 steps of max|w|/127 (~0.4% of the largest):
# measured on stories260K, the mean loss over TEXTS moved by 0.003 nats and the largest
# logit by 0.27 (logits span ±20.7). The tolerances leave room for other BLAS orderings.
Q8_0_LOSS_TOLERANCE = 0.02  # nats per token
Q8_0_LOGIT_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(MODEL_DIR, folder / "stories260K.F32.gguf")
    write_gguf(MODEL_DIR, folder / "stories260K.Q8_0.gguf", quantization="Q8_0")
    return folder


def _logits_and_loss(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    tokenizer, model = load_tokenizer(config), load_model(config, "cpu").eval()
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    logits, losses = [], []
    with torch.inference_mode():
        for row in ids:
            batch = torch.tensor([row])
            out = model(input_ids=batch, labels=batch)
            logits.append(out.logits[0])
            losses.append(out.loss)
    return torch.cat(logits), torch.stack(losses), ids


def test_f32_gguf_converts_to_a_folder_with_the_folder_models_tokens_and_logits(
    gguf_dir: Path, tmp_path: Path
):
    path = gguf_dir / "stories260K.F32.gguf"
    source = model_source(ModelConfig(name=str(path)), tmp_path / ".sift")
    folder = Path(source.config.name)
    assert folder.parent == tmp_path / ".sift" / "gguf"
    assert folder.name.startswith(file_md5(path) + "-")
    assert source.fingerprint == file_md5(path)  # lineage's model.base_md5
    assert source.config.gguf_file is None and (folder / "model.safetensors").is_file()
    assert json.loads((folder / RECORD).read_text())["md5"] == file_md5(path)

    logits, losses, ids = _logits_and_loss(source.config)
    ref_logits, ref_losses, ref_ids = _logits_and_loss(ModelConfig(name=str(MODEL_DIR)))
    assert ids == ref_ids  # the vocabulary came back from GGUF metadata alone
    assert torch.equal(logits, ref_logits) and torch.equal(losses, ref_losses)


def test_q8_0_gguf_is_close_to_the_folder_model(gguf_dir: Path, tmp_path: Path):
    source = model_source(
        ModelConfig(name=str(gguf_dir), gguf_file="stories260K.Q8_0.gguf"), tmp_path
    )
    logits, losses, _ = _logits_and_loss(source.config)
    ref_logits, ref_losses, _ = _logits_and_loss(ModelConfig(name=str(MODEL_DIR)))
    difference = (logits - ref_logits).abs().max().item()
    assert 0 < difference < Q8_0_LOGIT_TOLERANCE  # rounded, so not equal; close
    assert abs(losses.mean() - ref_losses.mean()).item() < Q8_0_LOSS_TOLERANCE
    assert source.fingerprint == file_md5(gguf_dir / "stories260K.Q8_0.gguf")


def test_a_second_use_reads_the_converted_folder_without_converting_again(
    gguf_dir: Path, tmp_path: Path, capfd
):
    config = ModelConfig(name=str(gguf_dir / "stories260K.F32.gguf"))
    first = model_source(config, tmp_path)
    weights = Path(first.config.name) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert "converted to" in capfd.readouterr().err
    second = model_source(config, tmp_path)
    assert second == first and weights.stat().st_mtime_ns == written
    line = capfd.readouterr().err
    assert "converted before" in line and "converted to" not in line


def test_an_unfinished_conversion_is_never_used(gguf_dir: Path, tmp_path: Path):
    """A folder without its record (a conversion killed before the rename, or one emptied
    since) is converted again, and leftover partial folders are not read."""
    config = ModelConfig(name=str(gguf_dir / "stories260K.F32.gguf"))
    folder = Path(model_source(config, tmp_path).config.name)
    (folder / RECORD).unlink()
    (folder / "model.safetensors").write_bytes(b"torn")
    (folder.parent / f".{folder.name}.123-abc.partial").mkdir()  # a killed run's
    again = model_source(config, tmp_path)
    assert Path(again.config.name) == folder and (folder / RECORD).is_file()
    ref, _, _ = _logits_and_loss(ModelConfig(name=str(MODEL_DIR)))
    assert torch.equal(_logits_and_loss(again.config)[0], ref)


def test_a_changed_gguf_changes_the_fingerprint_and_the_folder(gguf_dir: Path, tmp_path: Path):
    """The md5 keys embed/fine-tune caches (flows/tasks.py work_dir keys on the ModelSource)."""
    path = tmp_path / "model.gguf"
    path.write_bytes((gguf_dir / "stories260K.F32.gguf").read_bytes())
    before = model_source(ModelConfig(name=str(path)), tmp_path / ".sift")
    path.write_bytes((gguf_dir / "stories260K.Q8_0.gguf").read_bytes())  # replaced in place
    after = model_source(ModelConfig(name=str(path)), tmp_path / ".sift")
    assert before.fingerprint != after.fingerprint == file_md5(path)
    assert before.config.name != after.config.name


def _damaged(gguf_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what its error says)."""
    whole = (gguf_dir / "stories260K.F32.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[: len(whole) - 1000])  # the last tensor's data cut short
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(whole[:3000])  # inside the vocabulary's metadata
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"GGML" + whole[4:])
    unknown = write_gguf(MODEL_DIR, tmp_path / "unknown.gguf", architecture="sift-unknown")
    return {
        "truncated": (
            truncated,
            rf"is truncated: its tensors end at byte \d+, the file has {len(whole) - 1000}$",
        ),
        "truncated header": (cut_header, "is truncated or damaged: reading its header"),
        "empty": (empty, "is truncated: 0 bytes"),
        "wrong magic": (foreign, "is not a GGUF file: it starts with b'GGML', not b'GGUF'"),
        "unknown architecture": (unknown, "cannot load GGUF architecture 'sift-unknown'"),
        "missing": (tmp_path / "missing.gguf", "no such file"),
    }


def test_bad_gguf_files_fail_naming_the_file_and_the_setting(gguf_dir: Path, tmp_path: Path):
    for path, says in _damaged(gguf_dir, tmp_path).values():
        with pytest.raises(GgufError, match=f"^model.name '{path}'.*{says}"):
            model_source(ModelConfig(name=str(path)), tmp_path / ".sift")
        with pytest.raises(GgufError, match=f"^model.gguf_file '{path}'.*{says}"):
            model_source(ModelConfig(name=str(tmp_path), gguf_file=path.name), tmp_path)
    assert not (tmp_path / ".sift" / "gguf").exists() or not any(
        (tmp_path / ".sift" / "gguf").iterdir()
    )  # nothing half-converted was left behind


def test_check_paths_reads_the_gguf_header_before_any_run(gguf_dir: Path, tmp_path: Path):
    """The pipeline, `sift run` and every command that loads the model call check_paths
    first: a bad GGUF stops them there, before data is read or a run tracked."""
    damaged = _damaged(gguf_dir, tmp_path)
    for path, says in damaged.values():
        config = load_config(None, [f"model.name={path}", "data.allowed_roots=['/']"])
        with pytest.raises(GgufError, match=f"model.name '{path}'.*{says}"):
            check_paths(config, tmp_path)
    good = gguf_dir / "stories260K.F32.gguf"
    check_paths(load_config(None, [f"model.name={good}", "data.allowed_roots=['/']"]), tmp_path)


def test_a_gguf_outside_the_allowed_roots_is_refused_as_a_folder_is(gguf_dir: Path, tmp_path: Path):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    inside = project / "models" / "m.gguf"
    inside.write_bytes((gguf_dir / "stories260K.F32.gguf").read_bytes())
    relative = resolve_paths(load_config(None, ["model.name=models/m.gguf"]), project)
    assert relative.model.name == str(inside)
    check_paths(relative, project)  # data.allowed_roots ['.']: the project
    outside = load_config(None, [f"model.name={gguf_dir / 'stories260K.F32.gguf'}"])
    with pytest.raises(PathOutsideRoots, match="^model.name '.*stories260K.F32.gguf' resolves"):
        check_paths(outside, project)
    link = project / "models" / "link.gguf"
    link.symlink_to(gguf_dir / "stories260K.F32.gguf")
    with pytest.raises(PathOutsideRoots, match="outside data.allowed_roots"):
        check_paths(load_config(None, [f"model.name={link}"]), project)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.name=m.gguf", "model.gguf_file=n.gguf"], "name the file in one of them"),
        (["model.gguf_file=/abs/m.gguf"], "a .gguf file's path inside model.name"),
        (["model.gguf_file=../m.gguf"], "a .gguf file's path inside model.name"),
        (["model.gguf_file=model.safetensors"], "a .gguf file's path inside model.name"),
    ],
)
def test_model_gguf_file_must_name_a_gguf_inside_model_name(overrides, says):
    with pytest.raises(ValueError, match=says):
        load_config(None, overrides)


def test_a_gguf_config_is_never_loaded_around_its_conversion(gguf_dir: Path):
    config = ModelConfig(name=str(gguf_dir / "stories260K.F32.gguf"))
    for load in (load_tokenizer, lambda c: load_model(c, "cpu")):
        with pytest.raises(ValueError, match="names a GGUF checkpoint: load model_source"):
            load(config)
