"""Conversation rows into a staged table: one canonical conversation per row.

A conversation table has its own schema (CONVERSATION_SCHEMA): id (the user's own,
data.id_field, else the conversation's content hash), conversation (its canonical JSON,
steps/data/conversations.py conversation_json, roles normalised), source, split. Its places
table holds, beside each row's source place and content hash, the row's findings
(steps/data/conversation_checks.py) for validation to quarantine or refuse it with: the
published table never carries them. Prompt/response tables keep their schema and bytes
(steps/data/ingest.py SCHEMA); every later step tells the two apart by the conversation column.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steps.data.batch import Batch
from steps.data.conversation_checks import Finding
from steps.data.conversation_config import DEFAULT_MESSAGES_COLUMNS, ConversationFormat
from steps.data.conversation_formats import (
    DetectedFormat,
    conversation_columns,
    detect_format,
    read_conversations,
)
from steps.data.conversations import conversation_id, conversation_json
from steps.data.fields import id_column, user_ids
from steps.data.ingest_config import IngestConfig
from steps.data.local_files import IngestError

CONVERSATION_COLUMN = "conversation"
CONVERSATION_SCHEMA = ["id", CONVERSATION_COLUMN, "source", "split"]
CONVERSATION_ARROW_SCHEMA = pa.schema([(name, pa.string()) for name in CONVERSATION_SCHEMA])
CONVERSATION_PLACES_SCHEMA = pa.schema(
    [("place", pa.string()), ("content_id", pa.string()), ("findings", pa.string())]
)
CONVERSATION_FORMATS: tuple[ConversationFormat, ...] = ("messages", "sharegpt")


def batch_format(columns: Sequence[str], config: IngestConfig, source: str) -> DetectedFormat:
    """data.format for one batch (steps/data/conversation_formats.py detect_format). Under
    auto, columns that fit no format and hold no conversation column are prompt/response
    rows: their mapping's own error names the missing fields, as it did before data.format."""
    try:
        return detect_format(columns, config, config.format, config.conversation, source)
    except IngestError:
        conversational = set(DEFAULT_MESSAGES_COLUMNS.values()) & set(columns)
        if config.format != "auto" or conversational or config.conversation.messages_column:
            raise
        return DetectedFormat("prompt_response", "")


@dataclass(frozen=True)
class StagedConversations:
    """One batch as staged rows, with what its places table holds beside them."""

    table: pd.DataFrame  # CONVERSATION_SCHEMA
    content_ids: list[str]
    findings: list[str | None]  # findings_json of each row; None: none


def findings_json(findings: Sequence[Finding]) -> str | None:
    if not findings:
        return None
    return json.dumps([[f.check, f.where, f.detail] for f in findings], ensure_ascii=False)


def read_findings(text: str | None, place: str) -> list[Finding]:
    """What findings_json wrote, named at `place` again."""
    if text is None:
        return []
    return [Finding(check, place, where, detail) for check, where, detail in json.loads(text)]


def _row_hash(place: str) -> str:
    # A row with no canonical form duplicates nothing: its findings quarantine or refuse it.
    return hashlib.sha256(f"unread\x00{place}".encode()).hexdigest()[:16]


def stage_conversations(
    batch: Batch, config: IngestConfig, fmt: ConversationFormat, source: str, split: str
) -> StagedConversations:
    """A batch of conversation rows read into the canonical form; a row the checks find
    wrong keeps its canonical JSON (null where it has none) and carries its findings."""
    columns = conversation_columns(list(batch.frame.columns), fmt, config.conversation, source)
    read = read_conversations(batch, columns, config.conversation.tags, source)
    places = [f"{source} {where}" for where in batch.where]
    hashes = [
        _row_hash(place) if r.conversation is None else conversation_id(r.conversation)
        for r, place in zip(read, places, strict=True)
    ]
    column = id_column(batch, config.id_field, source)
    table = pd.DataFrame(
        {
            "id": hashes if column is None else user_ids(batch, column, source),
            CONVERSATION_COLUMN: [
                None if r.conversation is None else conversation_json(r.conversation) for r in read
            ],
            "source": source,
            "split": split,
        },
        columns=CONVERSATION_SCHEMA,
    )
    return StagedConversations(table, hashes, [findings_json(r.findings) for r in read])


def is_conversation_table(path: str | Path) -> bool:
    """Whether a staged or published table holds conversations (its schema says so)."""
    return CONVERSATION_COLUMN in pq.read_schema(path).names
