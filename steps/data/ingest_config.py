"""IngestConfig: where the data comes from, its format, and which fields hold prompt and
response or the turns of a conversation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from steps.data.conversation_config import ConversationConfig, DataFormat
from steps.data.fields import AUTO_ID

__all__ = ["IngestConfig"]


class IngestConfig(BaseModel):
    """Where the data comes from, its format, and which fields hold prompt and response or
    the turns of a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        default="assets/data/gsm8k/train.jsonl",
        description="The training pool: a .jsonl/.json/.csv/.parquet/.txt file (text ones may be "
        ".gz/.bz2/.xz/.zst), a folder holding only such files, or a hub dataset id.",
    )
    eval_source: str = Field(
        default="assets/data/gsm8k/test.jsonl",
        description="The held-out evaluation split: a file, folder or hub dataset id (a hub id "
        "reads data.eval_split).",
    )
    split: str = Field(default="train", description="Split of a hub dataset read as the pool.")
    eval_split: str = Field(
        default="test", description="Split of a hub dataset read as the evaluation split."
    )
    revision: str | None = Field(
        default=None,
        description="Hub datasets only: the commit to read, pinned for reproducibility.",
    )
    loader: Literal["auto", "datasets"] = Field(
        default="auto",
        description="auto: local paths are read by Sift's streaming readers, anything else as a "
        "hub id; datasets: always datasets.load_dataset (e.g. a local clone of a hub repo).",
    )
    # auto reads the columns: a `messages` or `conversations` column is a conversation, the
    # prompt/response fields' columns are prompt/response rows; both is an error naming them.
    format: DataFormat = Field(
        default="auto",
        description="auto (decided from each file's columns and printed), prompt_response, text, "
        "messages (OpenAI/TRL {role, content} turns) or sharegpt ({from, value} turns).",
    )
    conversation: ConversationConfig = Field(
        default_factory=ConversationConfig,
        description="Conversation data (data.format messages or sharegpt): its columns, "
        "ShareGPT role tags and which assistant turns carry the loss.",
    )
    prompt_field: str = Field(
        default="question",
        description='The prompt column, or a template over columns such as "{instruction}\\n'
        '{input}".',
    )
    response_field: str = Field(
        default="answer",
        description="The response column, or a template over columns; the model is trained on it.",
    )
    text_field: str | None = Field(
        default=None,
        description="Plain LM data: this column becomes the response and the prompt is empty "
        "(a .txt file always reads as one `text` column per non-blank line).",
    )
    id_field: str | None = Field(
        default=AUTO_ID,
        description="Column of unique example ids used in selection.json, MLflow and messages; "
        '"auto": `id` if present; null: none (ids are then the prompt + response hash).',
    )
    chat_template: str | None = Field(
        default=None,
        description="Prompt/response rows: render prompts at ingest with this tokenizer's chat "
        'template (hub id or folder; pair with model.prompt_template "{prompt}"). '
        "Conversations: the template they are rendered with (a .jinja file or a tokenizer), "
        "winning over the model's own; null: the model tokenizer's.",
    )
    # Stops `../../etc/passwd`-style paths in configs and links to them in data folders; the
    # settings it covers are listed in flows/config.py check_paths.
    allowed_roots: tuple[str, ...] = Field(
        default=(".", "assets"),
        description="Folders (project-relative) every local path a run reads or writes must "
        "resolve inside, symlinks followed; hub ids are not paths.",
    )
    limit: int | None = Field(
        default=None,
        gt=0,
        description="Cap on pool rows (the first in file order); null keeps all. Small caps make "
        "fast runs.",
    )
    eval_limit: int | None = Field(
        default=400,
        gt=0,
        description="Cap on evaluation rows (the first in file order); null keeps all.",
    )
