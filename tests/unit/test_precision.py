"""model.precision=auto: bf16 where it was measured faster, fp32 elsewhere (steps/modeling.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from steps import hardware
from steps.hardware import model_width, resolve_hardware, resolve_precision
from steps.modeling import ModelConfig
from tests.conftest import MODEL_DIR
from tests.gguf_files import write_gguf


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch):
    """A CPU that lists bf16 instructions, or one that does not, whatever this machine is."""

    def set_to(present: bool) -> None:
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: present)

    return set_to


@pytest.mark.parametrize(("width", "expected"), [(None, "fp32"), (64, "fp32"), (255, "fp32"),
                                                 (256, "bf16"), (576, "bf16")])  # fmt: skip
def test_auto_on_a_cpu_with_bf16_instructions_is_bf16_from_width_256(
    native_bf16, width: int | None, expected: str
) -> None:
    native_bf16(True)
    assert resolve_precision("auto", "cpu", width) == expected


def test_auto_on_a_cpu_without_bf16_instructions_is_fp32_at_any_width(native_bf16) -> None:
    native_bf16(False)
    assert resolve_precision("auto", "cpu", 4096) == "fp32"


def test_an_explicit_precision_is_kept(native_bf16) -> None:
    native_bf16(True)
    assert resolve_precision("fp32", "cpu", 576) == "fp32"
    assert resolve_precision("bf16", "cpu", 64) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu", 576)


def test_the_bundled_model_stays_fp32_so_the_demo_keeps_its_bytes(native_bf16) -> None:
    native_bf16(True)
    config = ModelConfig(name=str(MODEL_DIR))
    assert model_width(config) == 64
    assert resolve_hardware(config) == ("cpu", "fp32")


def test_a_gguf_width_is_read_from_its_header(tmp_path: Path, native_bf16) -> None:
    native_bf16(True)
    path = write_gguf(MODEL_DIR, tmp_path / "stories.gguf")
    assert model_width(ModelConfig(name=str(path))) == 64


def test_a_model_whose_config_cannot_be_read_stays_fp32(tmp_path: Path, native_bf16) -> None:
    native_bf16(True)
    assert model_width(ModelConfig(name=str(tmp_path))) is None  # a folder with no config
    assert resolve_hardware(ModelConfig(name=str(tmp_path))) == ("cpu", "fp32")
