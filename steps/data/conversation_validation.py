"""The suite over a table of conversations: each check of steps/data/conversation_checks.py
is a column the suite expects empty, so Great Expectations reports (and quarantine drops)
the rows that fail it, with the turn and why.

Ingest found the role order, empty, unknown-role, no-assistant and tool-JSON problems as it
read each row (they need the source's turn names) and left them in the places table; the
length is checked here, by encoding each conversation as training will (steps/encoding.py):
a conversation whose first assistant turn (train_on last_assistant: its last) ends past
model.max_length has no loss token left once trailing turns are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import great_expectations.expectations as gxe
import pandas as pd
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from steps.chat_encoding import encode_conversation
from steps.data.checks import BLANK, REASON
from steps.data.conversation_checks import (
    EMPTY_TURN,
    NO_ASSISTANT,
    ROLE_ORDER,
    TOO_LONG,
    TOOL_JSON,
    UNKNOWN_ROLE,
)
from steps.data.conversation_ingest import CONVERSATION_COLUMN, CONVERSATION_SCHEMA, read_findings
from steps.data.conversations import conversation_from_json
from steps.data.ingest import TableRef
from steps.encoding import ChatEncoding
from steps.modeling import ModelConfig

CHECKS: dict[str, str] = {
    ROLE_ORDER: "turns out of order: a system turn opens, an assistant turn follows a user or "
    "tool turn, a tool turn follows an assistant's tool call",
    EMPTY_TURN: "a turn with nothing visible (whitespace, control or zero-width characters)",
    UNKNOWN_ROLE: "a turn whose role is none of system, user, assistant, tool (or the "
    "data.conversation.tags)",
    NO_ASSISTANT: "no assistant turn to learn from",
    TOOL_JSON: "tool calls or the tools column are not JSON that parses",
    TOO_LONG: "no whole assistant turn fits model.max_length: no loss token would be left",
}
_PLACE = "row"  # what encode_conversation's reasons start with here (the report names the row)


def conversation_row_suite() -> list:
    """Expectations that hold row by row on a conversation table with its check columns."""
    suite = [
        gxe.ExpectTableColumnsToMatchSet(column_set=[*CONVERSATION_SCHEMA, *CHECKS]),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToNotMatchRegex(
            column="id", regex=BLANK, description="data.id_field id is empty or whitespace"
        ),
    ]
    for check, description in CHECKS.items():
        suite.append(
            gxe.ExpectColumnValuesToBeNull(
                column=check, description=description, meta={REASON: check}
            )
        )
    return suite


def findings_chunks(table: TableRef, chunk_rows: int) -> Iterator[list[str | None]]:
    """Each chunk's findings as ingest left them, chunk for chunk with the table read in
    batches of `chunk_rows`: a places table has the row groups of its table. A table ingest
    did not stage has none (empty lists)."""
    if table.staged is None:
        while True:
            yield []
    places = pq.ParquetFile(table.staged.places_path)
    for batch in places.iter_batches(batch_size=chunk_rows, columns=["findings"]):
        yield batch.column(0).to_pylist()


def with_conversation_checks(
    chunk: pd.DataFrame,
    findings: list[str | None],
    tokenizer: PreTrainedTokenizerBase,
    model: ModelConfig,
    chat: ChatEncoding,
) -> pd.DataFrame:
    """The chunk with a column per check: the turn and what is wrong, or None."""
    columns: dict[str, list[str | None]] = {check: [None] * len(chunk) for check in CHECKS}
    texts = chunk[CONVERSATION_COLUMN].tolist()
    for row, text in enumerate(texts):
        found = read_findings(findings[row] if findings else None, _PLACE)
        for finding in found:
            line = finding.line().removeprefix(f"{_PLACE}: ")
            previous = columns[finding.check][row]
            columns[finding.check][row] = line if previous is None else f"{previous}; {line}"
        if found or text is None:
            continue
        encoded = encode_conversation(
            tokenizer,
            conversation_from_json(text),
            chat.template,
            model.max_length,
            chat.train_on,
            _PLACE,
        )
        if encoded.reason is not None:
            columns[TOO_LONG][row] = encoded.reason.removeprefix(f"{_PLACE}: ")
    return chunk.assign(**columns)
