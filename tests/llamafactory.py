"""How LLaMA-Factory reads a dataset through its dataset_info.json entry, for the export tests:
the `formatting`, `columns` and `tags` its data/README.md documents, and the shape its
converter (src/llamafactory/data/converter.py, AlpacaDatasetConverter and
SharegptDatasetConverter) demands, written out in a few lines here (LLaMA-Factory is not a
dependency). The file is loaded with `datasets`, as LLaMA-Factory loads a local JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from steps.data.conversations import Conversation, Role, ToolCall, Turn, json_text

# LLaMA-Factory's data/dataset_info.json entry for its glaive_toolcall_en_demo.json
# (hiyouga/LLaMA-Factory, Apache-2.0; ../shared/data/llamafactory_demo/dataset_info.json).
GLAIVE_ENTRY = {
    "file_name": "glaive_toolcall_en_demo.json",
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "tools": "tools"},
}
# LLaMA-Factory's defaults where an entry names no column or tag (its data/parser.py).
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
# LLaMA-Factory's roles (but function: a tool call) as Sift's
ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "observation": "tool"}


@dataclass(frozen=True)
class Example:
    """One row as LLaMA-Factory aligns it: roles user, assistant, function, observation."""

    system: str
    tools: str
    messages: tuple[tuple[str, str], ...]  # (role, content)


def _sharegpt(row: dict, columns: dict, tags: dict) -> Example | None:
    """SharegptDatasetConverter: None where it skips the row ("Invalid role tag")."""
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "observation",
        tags["function_tag"]: "function",
        tags["system_tag"]: "system",
    }
    accept = (
        (tags["user_tag"], tags["observation_tag"]),
        (tags["assistant_tag"], tags["function_tag"]),
    )
    turns = row[columns.get("messages", "conversations")]
    system_column = columns.get("system")
    system = row[system_column] if system_column else ""
    if turns and turns[0][tags["role_tag"]] == tags["system_tag"]:
        system, turns = turns[0][tags["content_tag"]], turns[1:]
    aligned = []
    for index, turn in enumerate(turns):
        if turn[tags["role_tag"]] not in accept[index % 2]:
            return None
        aligned.append((roles[turn[tags["role_tag"]]], turn[tags["content_tag"]]))
    if len(aligned) % 2:
        return None  # "Invalid message count"
    tools = row[columns["tools"]] if columns.get("tools") else ""
    return Example(system or "", tools or "", tuple(aligned))


def _alpaca(row: dict, columns: dict) -> Example:
    """AlpacaDatasetConverter (no history): instruction and input joined by a newline."""
    query = [row[columns[k]] for k in ("prompt", "query") if columns.get(k) and row[columns[k]]]
    system = row[columns["system"]] if columns.get("system") else ""
    tools = row[columns["tools"]] if columns.get("tools") else ""
    messages = (("user", "\n".join(query)), ("assistant", row[columns["response"]]))
    return Example(system or "", tools or "", messages)


def read_dataset(dataset_dir: Path, name: str) -> list[Example | None]:
    """Dataset `name` of dataset_dir/dataset_info.json, read as LLaMA-Factory reads it."""
    entry = json.loads((dataset_dir / "dataset_info.json").read_text())[name]
    return read_entry(dataset_dir / entry["file_name"], entry)


def read_entry(path: Path, entry: dict) -> list[Example | None]:
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(path), split="train")
    if entry.get("formatting", "alpaca") == "sharegpt":
        tags = SHAREGPT_TAGS | entry.get("tags", {})
        return [_sharegpt(row, entry.get("columns", {}), tags) for row in rows]
    return [_alpaca(row, ALPACA_COLUMNS | entry.get("columns", {})) for row in rows]


def _calls(content: str) -> tuple[ToolCall, ...]:
    value = json.loads(content)
    items = value if isinstance(value, list) else [value]
    return tuple(ToolCall(c["name"], json_text(c["arguments"])) for c in items)


def as_conversation(example: Example) -> Conversation:
    """LLaMA-Factory's example in Sift's canonical form, to compare with what was exported."""
    turns = [Turn("system", example.system)] if example.system else []
    for role, content in example.messages:
        if role == "function":
            turns.append(Turn("assistant", "", tool_calls=_calls(content)))
        else:
            turns.append(Turn(ROLES[role], content))
    tools = json.loads(example.tools) if example.tools else None
    return Conversation(tuple(turns), json_text(tools) if tools else None)
