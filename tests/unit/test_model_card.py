"""The card registered versions carry: the base model's licence where it declares one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from steps.registry.model_card import declared_license, model_card
from tests.conftest import MODEL_DIR


def test_the_bundled_model_declares_mit_through_its_license_file() -> None:
    assert declared_license(str(MODEL_DIR)) == "mit"
    card = model_card("sift-gsm8k", {"model.base": str(MODEL_DIR), "git.sha": "abc123"})
    assert card.data.license == "mit"
    assert "git.sha: `abc123`" in card.text


def test_readme_front_matter_wins_over_the_license_file(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    (tmp_path / "LICENSE").write_text("MIT License\n\nCopyright\n")
    assert declared_license(str(tmp_path)) == "apache-2.0"


def test_unknown_licence_is_warned_once_and_not_declared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "LICENSE").write_text("Some custom terms\n")
    with caplog.at_level(logging.WARNING, logger="steps.registry.model_card"):
        card = model_card("mine", {"model.base": str(tmp_path)})
    assert card.data.license is None
    assert [r.getMessage() for r in caplog.records if "declares no licence" in r.getMessage()]
    assert declared_license("HuggingFaceTB/SmolLM2-135M") is None  # hub ids: not looked up
