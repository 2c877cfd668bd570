"""docs/reference/*.md are generated from the code (flows/cli/reference.py) and kept current;
every config field describes itself; the pages say what the code does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel

from flows.cli import reference
from flows.cli.main import app
from flows.config import PipelineConfig
from flows.servers import ServerFile
from steps.selection.cards import SELECTOR_CARDS
from steps.selection.selectors import SELECTORS
from steps.study.study import StudyConfig

ROOTS: tuple[type[BaseModel], ...] = (PipelineConfig, StudyConfig, ServerFile)


def config_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    """(dotted key, description) of every field of model and of the models it nests."""
    found = []
    for name, field in model.model_fields.items():
        found.append((f"{prefix}{name}", field.description))
        inner = reference.section_model(field)
        if inner is not None:
            found += config_fields(inner, f"{prefix}{name}.")
    return found


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell (a `code` key) -> the row's cells, for every table row of a page."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


@pytest.mark.parametrize("name", list(reference.PAGES))
def test_committed_reference_page_is_current(name: str) -> None:
    committed = reference.REFERENCE_DIR / name
    generated = reference.render()[name]
    assert committed.is_file(), f"docs/reference/{name} is missing: run `{reference.COMMAND}`"
    assert committed.read_text("utf-8") == generated, (
        f"docs/reference/{name} is stale (the code changed): run `{reference.COMMAND}` and "
        "commit the result"
    )


def test_every_config_field_has_a_one_line_description() -> None:
    missing = [
        f"{root.__name__}: {key}"
        for root in ROOTS
        for key, description in config_fields(root)
        if not (description or "").strip() or "\n" in (description or "")
    ]
    assert not missing, (
        "config fields need a one-line Field(description=...) (docs/reference/config.md is "
        f"generated from it): {missing}"
    )


def test_config_page_lists_every_pipeline_key_with_its_default() -> None:
    rows = table_rows(reference.render()["config.md"])
    defaults = dict(reference.leaf_values(PipelineConfig().model_dump(mode="json")))
    assert set(defaults) <= set(rows), sorted(set(defaults) - set(rows))
    for key, value in defaults.items():
        assert rows[key][2] == f"`{reference.yaml_value(value)}`", key
    # what a user reads: the budget `sift show-config` prints, a Literal's choices, a range
    assert rows["select.budget"][2] == "`0.1`"
    assert rows["data.loader"][1] == "auto \\| datasets"
    assert rows["validation.max_quarantine_fraction"][1] == "float (≥ 0.0, ≤ 1.0)"
    assert rows["registry.gate.metric"][2] == "`eval_loss`"


def test_config_page_shows_study_defaults_that_differ_from_the_pipeline() -> None:
    text = reference.render()["config.md"]
    assert table_rows(text)["study.arms"][3].startswith("Selection methods compared")
    study, pipeline = StudyConfig(), PipelineConfig()
    assert (study.data.limit, pipeline.data.limit) == (2000, None)
    assert "| `data.limit` | `2000` | `null` |" in text
    assert "| `finetune.epochs` | `1.0` | `3.0` |" in text
    assert "| `model.name` |" not in text.split("## Study config")[1]  # unchanged: not listed
    assert "| `server.start_timeout_s` | float (&gt; 0) | `120.0` |" in text


def test_cli_page_documents_every_command_and_option() -> None:
    text = reference.render()["cli.md"]
    root: Any = typer.main.get_command(app)
    for name, command in root.commands.items():
        assert f"## `sift {name}`" in text
        for param in command.params:
            assert reference.param_name(param) in text, (name, param.name)
    for name in ("up", "down", "status"):
        assert f"## `sift server {name}`" in text
    headings = [line for line in text.splitlines() if line.startswith("## `sift ")]
    order = [h.removeprefix("## `sift ").split()[0].rstrip("`") for h in headings]
    assert list(dict.fromkeys(order)) == list(root.commands)  # app order, each once
    assert "\x1b[" not in text  # no terminal colour


def test_selector_cards_match_the_registry() -> None:
    assert list(SELECTOR_CARDS) == list(SELECTORS)
    text = reference.render()["selectors.md"]
    for name, card in SELECTOR_CARDS.items():
        assert f"## `{name}`" in text
        assert card.summary and card.source and card.needs and card.cost, name
    assert "Sener & Savarese" in text and "arXiv 2505.14826" in text


def test_every_page_says_it_is_generated() -> None:
    for name, text in reference.render().items():
        assert text.splitlines()[0] == reference.GENERATED, name
        assert text.endswith("\n") and not text.endswith("\n\n"), name


def test_check_names_a_stale_page_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reference.main([], tmp_path) == 0
    assert reference.main(["--check"], tmp_path) == 0  # what it wrote is what it generates
    page = tmp_path / "cli.md"
    page.write_text(page.read_text("utf-8") + "hand edit\n", "utf-8")
    capsys.readouterr()
    assert reference.main(["--check"], tmp_path) == 1
    message = capsys.readouterr().err
    assert "cli.md is stale" in message and reference.COMMAND in message
    assert "config.md" not in message
    (tmp_path / "selectors.md").unlink()
    assert reference.stale_pages(tmp_path) == ["cli.md", "selectors.md"]


def test_escape_keeps_code_spans_and_table_cells() -> None:
    assert reference.escape("a | b * c <d>") == "a \\| b \\* c &lt;d&gt;"
    assert reference.escape("`x|y` and_z") == "`x|y` and\\_z"
    assert reference.yaml_value("Q: {p}\nA: ") == '"Q: {p}\\nA: "'
    assert reference.yaml_value(None) == "null" and reference.yaml_value("") == "''"
