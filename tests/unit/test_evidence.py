"""The caution line: which (selector, budget kind) has a measured edge over uniform, what the
others print, and that every recorded edge names a committed result file."""

from __future__ import annotations

import re

import pytest

from steps.selection.evidence import MEASURED_EDGES, caution, select_caution
from steps.selection.select import SelectConfig
from steps.selection.selectors import SELECTORS
from tests.conftest import REPO


def test_a_selector_without_a_measured_edge_gets_one_caution_line():
    line = caution("fisher", "tokens")
    assert line is not None and "\n" not in line
    assert line.startswith("caution: fisher has no measured edge over uniform at an equal token")
    assert "docs/results/" in line and line.endswith("see docs/results/selection-studies.md")
    assert (REPO / "docs/results/selection-studies.md").is_file()  # the page it points to
    assert "equal number of examples" in str(caution("fisher-pooled", "examples"))


def test_uniform_and_measured_edges_get_none():
    assert caution("uniform", "examples") is None and caution("uniform", "tokens") is None
    for selector, kind in MEASURED_EDGES:
        assert caution(selector, kind) is None


def test_an_unknown_budget_kind_is_refused():
    with pytest.raises(ValueError, match="'steps'"):
        caution("fisher", "steps")


def test_every_edge_is_a_registry_selector_with_a_committed_source():
    for (selector, kind), statement in MEASURED_EDGES.items():
        assert selector in SELECTORS and kind in ("examples", "tokens")
        sources = re.findall(r"docs/results/[\w./-]+", statement)
        assert sources and all((REPO / path).is_file() for path in sources), statement


def test_every_figure_of_an_edge_is_in_the_files_it_cites():
    """The statements copy Δ ± interval from the tables: a rerun that changes a table must
    change the statement too (the tables print a gain without its "+")."""
    for statement in MEASURED_EDGES.values():
        cited = "".join(
            (REPO / path).read_text() for path in re.findall(r"docs/results/[\w./-]+", statement)
        )
        figures = re.findall(r"[+-]?\d+\.\d{3} ± \d+\.\d{3}", statement)
        assert figures, statement
        for figure in figures:
            assert figure.lstrip("+") in cited, f"{figure} is in no file it cites: {statement}"


def test_the_budget_kind_is_what_the_select_section_counts():
    assert select_caution(SelectConfig(selector="uniform", budget_tokens=0.1)) is None
    tokens = select_caution(SelectConfig(selector="fisher", budget_tokens=0.1))
    assert tokens is not None and "token budget" in tokens
    per_token = select_caution(SelectConfig(selector="fisher-per-token", budget=0.1))
    assert per_token is not None and "token budget" in per_token  # its budget counts tokens
    examples = SelectConfig(selector="fisher", budget=0.1)
    assert select_caution(examples) == caution("fisher", "examples")
