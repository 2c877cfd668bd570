"""Field mapping: the configured source columns of one batch as prompt, response and id values.

Prompts and responses are a column or a template over columns ("{instruction}\n{input}");
ids are the user's own (data.id_field) or the content hash of prompt and response, which
stays the dedup key either way.
"""

from __future__ import annotations

import hashlib
import numbers
import string
from collections.abc import Callable

from steps.data.readers import Batch, IngestError

# data.id_field's default: the source's `id` column when it has one, else content hashes.
AUTO_ID = "auto"


def content_id(prompt: str, response: str) -> str:
    """The content hash of one example: its id when the source has none, and always the key
    that validation finds duplicates and eval/train leakage by."""
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def field_columns(field: str) -> list[str]:
    """The source columns a configured field reads: its template's fields, or itself."""
    return template_fields(field) if "{" in field else [field]


def _string_cell(value: object, place: str, column: str, setting: str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # null / NaN
        return None
    if not isinstance(value, str):
        raise IngestError(
            f"{place}: field '{column}' ({setting}) is {type(value).__name__} "
            f"{' '.join(repr(value).split())[:60]}, expected a string"  # one line, whatever it is
        )
    return value


def column_values(batch: Batch, setting: str, field: str, source: str) -> list[str | None]:
    """One configured field per row: a column, or a template over columns ("{a}\n{b}").

    Values must be strings (null is kept: the suite reports it, and quarantine can drop it);
    anything else is an error naming the setting, the line/row and the value.
    """
    frame = batch.frame
    columns = field_columns(field)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise IngestError(
            f"{source}: missing field(s) {missing} ({setting} = {field!r}); "
            f"columns present: {list(frame.columns)}"
        )
    cells = {c: frame[c].tolist() for c in columns}
    values: list[str | None] = []
    for index, place in enumerate(batch.where):
        row = {c: _string_cell(cells[c][index], f"{source} {place}", c, setting) for c in columns}
        if any(value is None for value in row.values()):
            values.append(None)
        else:
            values.append(field.format(**row) if "{" in field else row[field])
    return values


def id_column(batch: Batch, id_field: str | None, source: str) -> str | None:
    """The column holding the user's ids in this batch, or None for content hashes."""
    if id_field is None:
        return None
    if id_field == AUTO_ID:
        return "id" if "id" in batch.frame.columns else None
    if id_field not in batch.frame.columns:
        raise IngestError(
            f"{source}: data.id_field = {id_field!r} names no column; "
            f"columns present: {list(batch.frame.columns)}"
        )
    return id_field


def _id_cell(value: object, place: str, column: str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # null / NaN
        return None  # the suite reports a missing id, naming the row
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    # pandas turns an integer column with a null in it into floats: 7.0 is the id 7.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise IngestError(
        f"{place}: field '{column}' (data.id_field) is {type(value).__name__} "
        f"{value!r:.60}, expected a string or an integer"
    )


def user_ids(batch: Batch, column: str, source: str) -> list[str | None]:
    """The user's id of each row, as text (integers are written in decimal)."""
    values = batch.frame[column].tolist()
    return [
        _id_cell(v, f"{source} {place}", column)
        for v, place in zip(values, batch.where, strict=True)
    ]


def empty_prompt(prompt_field: str, render: Callable[[str], str] | None) -> str:
    """The prompt a row gets when every field data.prompt_field reads is empty: the
    template's own text (and the chat template's, when `render` applies one). A prompt with
    no visible text beyond this holds nothing of the example."""
    blank = {name: "" for name in template_fields(prompt_field)}
    prompt = prompt_field.format(**blank) if "{" in prompt_field else ""
    return render(prompt) if render is not None else prompt


def chat_renderer(chat_template: str | None) -> Callable[[str], str] | None:
    """data.chat_template as a function prompt -> rendered prompt (None when not configured)."""
    if chat_template is None:
        return None
    from transformers import AutoTokenizer  # heavy import, only when configured

    from steps.chat_encoding import JINJA_SUFFIXES  # imports transformers too

    if chat_template.endswith(JINJA_SUFFIXES):
        raise IngestError(
            f"data.chat_template = {chat_template!r}: a template file renders conversations "
            "(data.format messages or sharegpt); prompts of prompt/response rows are rendered "
            "with a tokenizer's chat template (a hub id or folder)"
        )

    tokenizer = AutoTokenizer.from_pretrained(chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise IngestError(
            f"data.chat_template: the tokenizer at {chat_template!r} has no chat template"
        )

    def render(prompt: str) -> str:
        turn = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True))

    return render
