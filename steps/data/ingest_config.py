"""IngestConfig: where the data comes from and which fields hold prompt and response."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from steps.data.fields import AUTO_ID

__all__ = ["IngestConfig"]


class IngestConfig(BaseModel):
    """Where the data comes from and which fields hold prompt and response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A file (.jsonl/.json/.csv/.parquet/.txt, text ones optionally .gz/.bz2/.xz/.zst), a
    # folder of such files and nothing else (see steps/data/local_files.py), or a hub id.
    source: str = "assets/data/gsm8k/train.jsonl"
    # Held-out split for evaluation: a file/folder/hub id; a hub id uses eval_split.
    eval_source: str = "assets/data/gsm8k/test.jsonl"
    split: str = "train"
    eval_split: str = "test"
    revision: str | None = None  # hub datasets only: pin a commit for reproducibility
    # auto: local paths are read by Sift's streaming readers, anything else is a hub id.
    # datasets: always `datasets.load_dataset(source, split, revision)`, e.g. for a local
    # clone of a hub dataset repo (a folder with train/test files or a loading config).
    loader: Literal["auto", "datasets"] = "auto"
    # A column name, or a template over columns such as "{instruction}\n{input}".
    prompt_field: str = "question"
    response_field: str = "answer"
    # Plain LM data: this column becomes the response and the prompt is empty. A .txt file
    # always reads as one `text` column per non-blank line.
    text_field: str | None = None
    # The column holding the user's own example ids, which then name the examples in
    # selection.json, MLflow and validation messages (they must be unique and non-empty).
    # "auto": the column `id` when the source has one, else none; null: none. Without ids,
    # an example's id is the content hash of prompt + response (the dedup key either way).
    id_field: str | None = AUTO_ID
    # Render each prompt with this tokenizer's chat template (hub id or local folder): one
    # user turn plus the assistant-turn opener. Pair it with model.prompt_template "{prompt}"
    # so that no second template wraps it. None keeps prompts as they are.
    chat_template: str | None = None
    # Every local path a run reads must resolve (symlinks followed) inside one of these
    # folders: data and eval sources and every file in a folder source, model.name and
    # data.chat_template folders, select.target, finetune.accelerate_config, eval.suite /
    # data_dir / include_path and what their YAMLs name, study.results_dir (flows/config.py
    # check_paths). Relative entries are relative to the project; hub ids are not paths.
    # Stops `../../etc/passwd`-style paths in configs and links to them in data folders.
    allowed_roots: tuple[str, ...] = (".", "assets")
    # Cap on pool / eval rows (first rows in file order); None keeps all. Small caps make fast runs.
    limit: int | None = Field(default=None, gt=0)
    eval_limit: int | None = Field(default=400, gt=0)
