"""The expectation suite over ingested data, as Great Expectations objects (run by validate.py).

Text checks read "empty" as "no visible character": a response of spaces, newlines, control
or zero-width characters teaches nothing, and neither does a prompt that is only its
template's own text.
"""

from __future__ import annotations

import re

import great_expectations.expectations as gxe
from great_expectations.expectations.metadata_types import FailureSeverity

from steps.data.ingest import SCHEMA
from steps.data.invisible import BLANK, INVISIBLE, VISIBLE_OR_EMPTY

# Control characters other than tab and newlines, C1 included (\x80-\x9f: mis-decoded
# Windows-1252 text, e.g. \x92 for an apostrophe): valid UTF-8, almost always extraction debris.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# INVISIBLE, BLANK: what "no visible character" means, in steps/data/invisible.py (light: the
# conversation checks read it without importing Great Expectations).

# An expectation's meta key: the regex whose first match its quoted values start near
# (validate.py), so a character deep in a long text shows in the message.
QUOTE_FROM = "quote_from"
# An expectation's meta key: a failing row's quarantine reason is this value followed by what
# the row holds, instead of the expectation's type (steps/data/conversation_validation.py).
REASON = "reason"
# The severity of an expectation whose failing rows are reported and kept (validate.py).
FLAG = FailureSeverity.WARNING
# Characters that reorder or hide text: bidi embeddings, overrides and isolates (U+202A-U+202E,
# U+2066-U+2069: "Trojan Source", CVE-2021-42574, text displayed in another order than it
# reads), deprecated format controls, interlinear annotations and tag characters (U+E0020-
# U+E007F, "ASCII smuggling", counted outside an emoji flag's tag sequence). Each can carry
# instructions a reader does not see, which the model would learn: such rows fail (or are
# quarantined, validation.on_invalid).
REORDERING = (
    r"[\u202a-\u202e\u2066-\u206f\ufff9-\ufffb\U000e0001]"
    r"|(?<![\U0001f3f4\U000e0020-\U000e007e])[\U000e0020-\U000e007f]"
)
# Zero-width characters inside visible text: zero-width space, word joiner, invisible operators,
# a byte-order mark, and zero-width (non-)joiners where they join nothing (U+200C/U+200D spell
# Persian and Indic words and join emoji: next to an edge, whitespace or another invisible
# character they join nothing). They hide nothing of the text's meaning, and real corpora carry
# them (GSM8K test line 394 has a U+200B), so they are flagged with their lines, not dropped.
ZERO_WIDTH = (
    r"[\u200b\u2060-\u2064\ufeff]"
    rf"|(?<![^{INVISIBLE}])[\u200c\u200d]|[\u200c\u200d](?![^{INVISIBLE}])"
)


def in_visible_text(pattern: str) -> str:
    """`pattern` found in text with something visible (text of nothing visible is reported as
    blank instead: one reason per row)."""
    return rf"\A(?=[\s\S]*[^{INVISIBLE}])[\s\S]*?(?:{pattern})"


# An unfilled template field: {question}, {{ question }}, ${question}.
PLACEHOLDER = r"\$?\{\{?[ \t]*[A-Za-z_][\w.-]*[ \t]*\}\}?"


def visible(text: str) -> str:
    return re.sub(f"[{INVISIBLE}]", "", text)


def same_visible_text(text: str) -> str:
    """A regex matching exactly the strings whose visible characters are those of `text`."""
    gap = f"[{INVISIBLE}]*"
    return r"\A" + gap + "".join(re.escape(char) + gap for char in visible(text)) + r"\Z"


def placeholder_only(template_text: str) -> str:
    """A regex matching the strings whose visible characters are `template_text`'s, with one
    or more unfilled template fields (PLACEHOLDER) and nothing else between them."""
    gap = f"(?:[{INVISIBLE}]|{PLACEHOLDER})*"
    chars = "".join(re.escape(char) + gap for char in visible(template_text))
    return rf"\A(?=[\s\S]*{PLACEHOLDER})" + gap + chars + r"\Z"


def row_suite(max_prompt_tokens: int, empty_prompt: str | None) -> list:
    """Expectations that hold row by row (checked on each chunk of a split).

    `empty_prompt` is what a prompt is when all its fields are empty (StagedRows); None
    where prompts may be empty (plain LM data)."""
    text_columns = ["prompt", "response"]
    suite = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*SCHEMA, "prompt_tokens"], exact_match=True),
        # Responses carry the loss and may not be empty.
        gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),
        # A prompt that fills the context leaves no response token to learn from.
        gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=max_prompt_tokens - 1),
    ]
    for column in ["id", *text_columns]:
        suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for column in text_columns:
        # pandas 3 string dtype: "str" is the type name GX matches (see docs/stack-notes.md).
        suite.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"))
        suite.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column, regex=CONTROL_CHARS, meta={QUOTE_FROM: CONTROL_CHARS}
            )
        )
        suite.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column,
                regex=in_visible_text(REORDERING),
                description=f"{column} holds characters that reorder or hide text: bidi "
                "override/isolate, tag or interlinear annotation characters",
                meta={QUOTE_FROM: REORDERING},
            )
        )
        suite.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column,
                regex=in_visible_text(ZERO_WIDTH),
                description=f"{column} holds zero-width characters (zero-width space, word "
                "joiner, BOM, a joiner that joins nothing); kept, flagged only",
                meta={QUOTE_FROM: ZERO_WIDTH},
                severity=FLAG,  # validate.py reports these rows, never drops them
            )
        )
    # Last, so that a row failing the checks above keeps its reasons in the same order.
    suite.append(
        gxe.ExpectColumnValuesToMatchRegex(
            column="response",
            regex=VISIBLE_OR_EMPTY,
            description="response is only whitespace, control or zero-width characters",
        )
    )
    # Ids are content hashes or the user's own (data.id_field), which may not be blank.
    suite.append(
        gxe.ExpectColumnValuesToNotMatchRegex(
            column="id", regex=BLANK, description="data.id_field id is empty or whitespace"
        )
    )
    suite.append(
        gxe.ExpectColumnValuesToNotMatchRegex(
            column="response",
            regex=placeholder_only(""),
            description="response is only an unfilled template field such as '{answer}'",
        )
    )
    if empty_prompt is not None:
        suite.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column="prompt",
                regex=same_visible_text(empty_prompt),
                description="prompt has no text of its own: its data.prompt_field fields are "
                "empty or whitespace",
            )
        )
        suite.append(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column="prompt",
                regex=placeholder_only(empty_prompt),
                description="prompt is only unfilled template fields such as '{question}' "
                "(beside data.prompt_field's own text): placeholders, not an example",
            )
        )
    return suite


def split_suite(
    split: str, min_rows: int, leaked: list[str], user_ids: bool, same: str = "prompt and response"
) -> list:
    """Expectations over a whole split, run on its keys alone: `content_id`, the hash of
    (prompt, response) or of the canonical conversation (`same` says which), so a repeat is
    an exact duplicate; and `id`, the user's ids where they are not content hashes
    (`user_ids`)."""
    suite = [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        gxe.ExpectColumnValuesToBeUnique(
            column="content_id", description=f"exact duplicates: the same {same}"
        ),
    ]
    if user_ids:
        suite.append(
            gxe.ExpectColumnValuesToBeUnique(column="id", description="data.id_field ids repeat")
        )
    if split == "eval":
        # Leakage: an eval example identical to a training example inflates the eval score.
        # The value set is the training hashes that also occur in eval (the rest cannot
        # match), so the stored suite stays small for any pool size.
        suite.append(
            gxe.ExpectColumnValuesToNotBeInSet(
                column="content_id",
                value_set=leaked,
                description=f"eval examples also in the training pool (same {same})",
            )
        )
    return suite
