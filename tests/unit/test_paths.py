"""steps.paths: a path is inside the allowed roots only after every symlink is followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from steps.paths import PathOutsideRoots, inside_roots, resolved_roots


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, list[Path]]:
    """project/ (the allowed root) holding a file, links in and out, and a link loop."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "data").mkdir(parents=True)
    outside.mkdir()
    (project / "data" / "a.jsonl").write_text("{}\n")
    (outside / "secret.txt").write_text("secret\n")
    (project / "data" / "in.jsonl").symlink_to(project / "data" / "a.jsonl")
    (project / "data" / "out.txt").symlink_to(outside / "secret.txt")
    (project / "data" / "out-dir").symlink_to(outside)
    (project / "data" / "loop").symlink_to(project / "data" / "loop")
    return project, resolved_roots(["."], project)


def test_a_path_or_link_inside_the_roots_resolves_to_its_target(layout):
    project, roots = layout
    data = project / "data"
    assert inside_roots(data / "a.jsonl", roots, "data.source") == (data / "a.jsonl").resolve()
    assert inside_roots(data / "in.jsonl", roots, "data.source") == (data / "a.jsonl").resolve()
    assert inside_roots(project / "data" / ".." / "data", roots, "data.source") == data.resolve()


@pytest.mark.parametrize("name", ["out.txt", "out-dir/secret.txt", "../../outside/secret.txt"])
def test_a_path_leading_outside_names_setting_link_and_target(layout, name):
    project, roots = layout
    target = (project.parent / "outside" / "secret.txt").resolve()
    with pytest.raises(PathOutsideRoots) as raised:
        inside_roots(project / "data" / name, roots, "data.eval_source")
    message = str(raised.value)
    assert message.startswith(f"data.eval_source '{project / 'data' / name}' resolves to {target}")
    assert "outside data.allowed_roots" in message and "\n" not in message
    assert isinstance(raised.value, ValueError)


def test_the_roots_setting_is_named_and_a_symlink_loop_is_refused(layout):
    project, roots = layout
    with pytest.raises(PathOutsideRoots, match=r"outside eval\.allowed_dirs \["):
        inside_roots(Path("/etc/passwd"), roots, "eval.output", roots_setting="eval.allowed_dirs")
    with pytest.raises(PathOutsideRoots, match=r"data\.source '.*loop' cannot be resolved"):
        inside_roots(project / "data" / "loop", roots, "data.source")
