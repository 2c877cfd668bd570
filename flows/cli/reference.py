"""`python -m flows.cli.reference [--check]`: the documentation site's reference pages,
generated from the code (docs/reference/config.md, cli.md, selectors.md).

config.md walks the config models (their fields' descriptions, types, constraints and
defaults), cli.md the typer app's click commands, selectors.md the selector registry's cards
(steps/selection/selectors.py SELECTOR_CARDS) and the study evidence (evidence.py). The
output depends on nothing but the code: no terminal width, no colour, no environment, so
`--check` (and tests/unit/test_reference_docs.py) can compare it byte for byte with the
committed pages.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flows.cli.main import app
from flows.config import PipelineConfig
from flows.servers import ServerFile
from steps.selection import evidence
from steps.selection.cards import SELECTOR_CARDS
from steps.selection.selectors import SELECTORS
from steps.study.study import StudyConfig

COMMAND = "python -m flows.cli.reference"
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "docs" / "reference"
GENERATED = f"_Generated from the code by `{COMMAND}`: do not edit by hand._"
# Characters Markdown would read as markup in a table cell (outside code spans).
ESCAPED = {"\\": "\\\\", "|": "\\|", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]",
           "<": "&lt;", ">": "&gt;"}  # fmt: skip
# annotated_types constraints (pydantic Field's gt/ge/lt/le) as written in the type column
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def escape(text: str) -> str:
    """Text for a Markdown table cell: markup escaped outside `code spans`, kept inside."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = [text]
    return "`".join(
        part if inside else "".join(ESCAPED.get(c, c) for c in part)
        for part, inside in zip(parts, [i % 2 == 1 for i in range(len(parts))], strict=True)
    )


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; cells are already Markdown (escape() them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def code(text: str) -> str:
    return f"`{text}`"


def page(title: str, body: list[str]) -> str:
    """A page: the generated-file line, the title, the body, one trailing newline."""
    text = "\n".join([GENERATED, "", f"# {title}", "", *body]).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


# --- config.md ----------------------------------------------------------------------------


def yaml_value(value: Any) -> str:
    """A default as one line of YAML (what a config file would say); strings with line
    breaks double-quoted, with \\n."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20)
    text = text.removesuffix("\n").removesuffix("\n...")
    if "\n" in text:
        text = yaml.safe_dump(value, default_style='"', allow_unicode=True, width=1 << 20)
        text = text.removesuffix("\n").removesuffix("\n...")
    return text


def type_text(annotation: Any) -> str:
    """A field's type as a YAML user reads it: choices for a Literal, null for None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(choice) for choice in args)
    if origin in (Union, types.UnionType):
        kinds = [type_text(arg) for arg in args if arg is not type(None)]
        nullable = type(None) in args
        return " or ".join(kinds + (["null"] if nullable else []))
    if origin in (list, tuple):
        item = type_text(args[0])
        return f"list of ({item})" if "|" in item or " or " in item else f"list of {item}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(field: FieldInfo) -> str:
    """The field's numeric constraints: '> 0', '≥ 0, ≤ 65535', or ''."""
    found = []
    for constraint in field.metadata:
        for name, symbol in BOUNDS.items():
            limit = getattr(constraint, name, None)
            if limit is not None:
                found.append(f"{symbol} {limit}")
    return ", ".join(found)


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The config model a field holds (a section or a nested model), else None."""
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def config_table(model: type[BaseModel], values: dict[str, Any], prefix: str) -> list[str]:
    """One section's table: key, type, default (the root config's, dumped), description;
    nested models get their own table below it, under a heading of their dotted key."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = section_model(field)
        if inner is not None:
            nested += ["", f"#### `{key}`", "", escape(field.description or "")]
            nested += ["", *config_table(inner, values[name], f"{key}.")]
            continue
        kind = type_text(field.annotation)
        if limits := bounds_text(field):
            kind = f"{kind} ({limits})"
        default = yaml_value(values[name])
        rows.append([code(key), escape(kind), code(default), escape(field.description or "")])
    return table(["Key", "Type", "Default", "Description"], rows) + nested


def config_sections(root: BaseModel, names: list[str] | None = None) -> list[str]:
    """A heading, the description and the table of each section of a root config."""
    values = root.model_dump(mode="json")
    lines: list[str] = []
    for name, field in type(root).model_fields.items():
        model = section_model(field)
        if model is None or (names is not None and name not in names):
            continue
        lines += [f"### `{name}`", "", escape(field.description or ""), ""]
        lines += [*config_table(model, values[name], f"{name}."), ""]
    return lines


def leaf_values(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from leaf_values(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def study_differences(study: StudyConfig, pipeline: PipelineConfig) -> list[str]:
    """The study's sections shared with the pipeline, and the defaults that differ there."""
    shared = [name for name in StudyConfig.model_fields if name in PipelineConfig.model_fields]
    own = {key: value for key, value in leaf_values(study.model_dump(mode="json"))}
    theirs = dict(leaf_values(pipeline.model_dump(mode="json")))
    rows = [
        [code(key), code(yaml_value(own[key])), code(yaml_value(theirs[key]))]
        for key in own
        if key.split(".")[0] in shared and own[key] != theirs[key]
    ]
    named = ", ".join(code(name) for name in shared)
    return [
        f"The sections {named} are the pipeline's (tables above), with these defaults changed "
        "for the study:",
        "",
        *table(["Key", "Study default", "Pipeline default"], rows),
        "",
    ]


CONFIG_INTRO = [
    "Every setting has a default; a YAML file and `--set` only override. Defaults come "
    "first, then the file named by `--config`/`-c` (examples under `configs/`, e.g. "
    "`configs/demo.yaml`), then each `--set key=value` in order (the value is read as YAML: "
    "`--set select.budget=0.05`, `--set eval.tasks='[gsm8k]'`, `--set data.limit=null`).",
    "",
    "```yaml",
    "# a config file: sections as below, only the keys you change",
    "select:",
    "  selector: uniform",
    "  budget: 200",
    "finetune:",
    "  epochs: 1",
    "```",
    "",
    "An unknown key, a wrong type or a value outside its range fails when the config loads, "
    "with a one-line error naming the key, before anything runs. `sift show-config` prints "
    "the resolved pipeline config as YAML. Local paths are relative to the project and must "
    "lie inside `data.allowed_roots`.",
    "",
    "Defaults below are shown as YAML would write them; a type's range is in parentheses.",
    "",
]


def config_page() -> str:
    pipeline, study = PipelineConfig(), StudyConfig()
    body = [
        *CONFIG_INTRO,
        "## Pipeline config",
        "",
        "Read by every `sift` command that takes `--config`/`--set`, except `sift study` and "
        "`sift server up`.",
        "",
        *config_sections(pipeline),
        "## Study config",
        "",
        "Read by `sift study` (examples: `configs/study*.yaml`): the sections below, and the "
        "pipeline's sections it reuses.",
        "",
        *config_sections(study, ["study", "synthetic"]),
        *study_differences(study, pipeline),
        "## Server config",
        "",
        "Read by `sift server up` (`--config`, `--set server.KEY=VALUE`): one `server:` "
        "section; the pipeline's config has none.",
        "",
        *config_sections(ServerFile()),
    ]
    return page("Configuration reference", body)


# --- cli.md -------------------------------------------------------------------------------


def help_text(text: str | None) -> list[str]:
    """A docstring as Markdown paragraphs: click's \\f cut honoured, lines rejoined."""
    text = inspect.cleandoc((text or "").split("\f")[0])
    paragraphs = [escape(" ".join(block.split())) for block in text.split("\n\n")]
    return [line for paragraph in paragraphs if paragraph for line in (paragraph, "")]


def param_name(param: Any) -> str:
    if param.param_type_name == "argument":
        metavar = param.metavar or param.name.upper()
        return code(metavar if param.required or metavar.startswith("[") else f"[{metavar}]")
    return ", ".join(code(opt) for opt in [*param.opts, *param.secondary_opts])


def param_type(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    kind = param.bare_type().replace("list[str]", "str").lower()
    ends = (("≥", getattr(param, "min", None)), ("≤", getattr(param, "max", None)))
    limits = [f"{symbol} {value}" for symbol, value in ends if value is not None]
    if limits:
        kind = f"{kind} ({', '.join(limits)})"
    return f"{kind}, repeatable" if param.multiple else kind


def param_default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if callable(default) or default is None or default == [] or default == ():
        return ""
    if getattr(param, "is_flag", False):
        return "on" if default else "off"
    return code(str(default))


def options_table(params: list[Any]) -> list[str]:
    rows = [
        [param_name(p), escape(param_type(p)), param_default(p), escape(p.help or "")]
        for p in params
    ]
    return table(["Option", "Type", "Default", "Help"], rows)


def command_section(command: Any, path: list[str]) -> list[str]:
    """One command's heading, usage, help and options table; groups recurse."""
    lines = [f"## `{' '.join(path)}`", "", *help_text(command.help)]
    subcommands = getattr(command, "commands", None)
    params = [param for param in command.params if not param.hidden]
    arguments = [param_name(p).strip("`") for p in params if p.param_type_name == "argument"]
    usage = " ".join([*path, *(["[OPTIONS]"] if params else []), *arguments])
    usage += " COMMAND" if subcommands else ""
    lines += [f"Usage: `{usage}`", ""]
    if params:
        lines += [*options_table(params), ""]
    for name, sub in (subcommands or {}).items():
        if not sub.hidden:
            lines += command_section(sub, [*path, name])
    return lines


def cli_page() -> str:
    root: Any = typer.main.get_command(app)  # a group: its commands, in registration order
    body = [
        "Every `sift` command, its options and their defaults, in the order `sift --help` "
        "lists them. `python -m flows.cli` runs the same commands from a checkout.",
        "",
        "## `sift`",
        "",
        *help_text(root.help),
        "Usage: `sift [OPTIONS] COMMAND`",
        "",
        *options_table([param for param in root.params if not param.hidden]),
        "",
    ]
    for name, command in root.commands.items():  # registration order: `sift --help`'s
        if not command.hidden:
            body += command_section(command, ["sift", name])
    return page("Command-line reference", body)


# --- selectors.md -------------------------------------------------------------------------


def evidence_text(selector: str) -> str:
    """What the committed studies measured for a selector, per budget kind (evidence.py)."""
    if selector == evidence.BASELINE:
        return "The baseline every edge is measured against."
    found = []
    for kind, words in evidence.BUDGET_KINDS.items():
        edge = evidence.MEASURED_EDGES.get((selector, kind))
        found.append(
            edge
            or f"At an equal {words}: no measured edge over {evidence.BASELINE} "
            "(`sift select` and `sift run` print a caution)."
        )
    return " ".join(edge if edge.endswith(".") else f"{edge}." for edge in found)


def selectors_page() -> str:
    body = [
        "The selectors `select.selector` (and `study.arms`, `synthetic.selectors`) can name: "
        "`SELECTORS` in `steps/selection/selectors.py`, each with its card "
        "(`steps/selection/cards.py`) "
        "and the study evidence of `steps/selection/evidence.py`. N is the pool's examples, "
        "k the picks, d the (sketched) state width (`embed.sketch_dim`), r an example's "
        "factor rank (`embed.max_rank`). Every selector reports the same token-level "
        "objective after each pick, so curves compare; the picks never depend on "
        "`select.backend` or thread counts.",
        "",
        *table(
            ["Selector", "Summary", "Source"],
            [
                [code(name), escape(card.summary), escape(card.source)]
                for name, card in SELECTOR_CARDS.items()
            ],
        ),
        "",
    ]
    for name, card in SELECTOR_CARDS.items():
        body += [
            f"## `{name}`",
            "",
            escape(card.summary),
            "",
            f"- **Source:** {escape(card.source)}",
            f"- **Needs:** {escape(card.needs)}",
            f"- **Cost:** {escape(card.cost)}",
            f"- **Measured:** {escape(evidence_text(name))}",
            "",
        ]
    missing = set(SELECTORS) ^ set(SELECTOR_CARDS)
    if missing:
        raise ValueError(f"SELECTORS and SELECTOR_CARDS differ: {sorted(missing)}")
    return page("Selector reference", body)


PAGES: dict[str, Callable[[], str]] = {
    "config.md": config_page,
    "cli.md": cli_page,
    "selectors.md": selectors_page,
}


def render() -> dict[str, str]:
    """Page file name -> its Markdown, as generated from the code now."""
    return {name: make() for name, make in PAGES.items()}


def stale_pages(directory: Path = REFERENCE_DIR) -> list[str]:
    """The pages under directory that are missing or differ from render()."""
    return [
        name
        for name, text in render().items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    ]


def main(argv: list[str] | None = None, directory: Path = REFERENCE_DIR) -> int:
    """Write the pages into directory; with --check, write nothing and exit 1 naming each
    stale page and the command that regenerates it."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a committed page is stale; write nothing"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages(directory)
        for name in stale:
            print(f"{directory / name} is stale: regenerate it with `{COMMAND}`",
                  file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (directory / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {directory / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
