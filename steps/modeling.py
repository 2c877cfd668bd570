"""Loading a causal LM and turning prompt/response pairs into loss-masked token ids.

Shared by embed, finetune and evaluate, so all three see exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from steps.gguf import (
    GGUF_SUFFIX,
    converted_folder,
    gguf_md5,
    named_checkpoint,
    names_gguf,
)
from steps.hashing import file_md5

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips: prompt tokens carry no loss

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PromptFormat = Literal["template", "chat"]
DEFAULT_PROMPT_TEMPLATE = "Question: {prompt}\nAnswer: "


class ModelConfig(BaseModel):
    """The base model and how examples are shown to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The bundled default is tiny (260k parameters) so the whole pipeline runs on a laptop
    # CPU in minutes.
    name: str = Field(
        default="assets/models/stories260K",
        description="The base model: a Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B), a local "
        "folder, or a local .gguf file (converted once to an fp32 folder under .sift/gguf/).",
    )
    gguf_file: str | None = Field(
        default=None,
        description="A .gguf file inside model.name (a local folder or a hub repo) to load "
        "instead of its transformers weights; converted once, as a .gguf model.name is.",
    )
    revision: str | None = Field(
        default=None, description="Hub models only: the commit, branch or tag to load."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run the model's own Python from the hub: arbitrary code, so off unless you "
        "trust its authors.",
    )
    prompt_format: PromptFormat = Field(
        default="template",
        description="template: the prompt shown through model.prompt_template, the response "
        "ending with the EOS token; chat: the tokenizer's chat template renders the prompt as a "
        "user turn and the response ends with the template's end-of-turn token (Instruct "
        "models).",
    )
    prompt_template: str = Field(
        default=DEFAULT_PROMPT_TEMPLATE,
        description="prompt_format template only: how a prompt is shown; the response follows "
        "directly and ends with the EOS token.",
    )
    max_length: int = Field(
        default=512,
        gt=8,
        description="Tokens per example; longer examples are cut from the right. Must not exceed "
        "the model's context.",
    )
    device: Device = Field(
        default="auto",
        description="auto: CUDA when present, else CPU; cuda without a visible GPU is an error, "
        "not a fallback.",
    )
    precision: Precision = Field(
        default="auto",
        description="auto: bf16 on GPUs that support it and on CPUs with bf16 instructions "
        "(AVX512-BF16, AMX) for models of hidden size >= 256, else fp32; fp16 needs CUDA.",
    )

    @model_validator(mode="after")
    def _one_gguf_setting(self) -> ModelConfig:
        """model.gguf_file names a file inside model.name: a path that stays there."""
        file = self.gguf_file
        if file is None:
            return self
        if self.name.lower().endswith(GGUF_SUFFIX):
            raise ValueError(
                f"model.gguf_file={file!r} with model.name={self.name!r}, a .gguf file already: "
                "name the file in one of them"
            )
        if (
            not file.lower().endswith(GGUF_SUFFIX)
            or Path(file).is_absolute()
            or ".." in Path(file).parts
        ):
            raise ValueError(
                f"model.gguf_file={file!r}: a .gguf file's path inside model.name, e.g. "
                "'model.Q4_K_M.gguf'"
            )
        return self

    @model_validator(mode="after")
    def _template_only_in_template_format(self) -> ModelConfig:
        # Checked, not ignored: a template someone wrote would silently not apply.
        if self.prompt_format == "chat" and self.prompt_template != DEFAULT_PROMPT_TEMPLATE:
            raise ValueError(
                "model.prompt_template applies to model.prompt_format=template only; with chat "
                "the prompt is the user turn as it is (data.prompt_field can add text around it)"
            )
        return self


def _loadable(config: ModelConfig) -> None:
    """A GGUF is loaded as the folder model_source converts it to, never directly (each
    load would dequantize it again, and a tokenizer would not load from a .gguf path)."""
    if names_gguf(config.name, config.gguf_file):
        raise ValueError(
            f"model.name={config.name!r} (model.gguf_file={config.gguf_file!r}) names a GGUF "
            "checkpoint: load model_source(config, state_dir).config, its converted folder"
        )


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    _loadable(config)
    tokenizer = AutoTokenizer.from_pretrained(
        config.name, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, device: str) -> PreTrainedModel:
    """Weights stay fp32 in memory; reduced precision comes from autocast (CPU and GPU)."""
    _loadable(config)
    model = AutoModelForCausalLM.from_pretrained(
        config.name,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=torch.float32,
        use_safetensors=True,  # never unpickle weights
    )
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() narrowly


@dataclass(frozen=True)
class Encoded:
    """One example's input ids and labels (prompt positions are IGNORE_INDEX)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        # Labels are shifted inside the model, so the first label never carries loss.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(frozen=True)
class PromptShape:
    """model.prompt_format resolved against one tokenizer: how a prompt becomes text, whether
    the tokenizer adds its special tokens (BOS) to that text, and the ids every response ends
    with. Every place a prompt is shown (embed, fine-tune, held-out loss, sample generations,
    validation's token counts, a target sample, the chat serving example) takes it from here."""

    text: Callable[[str], str]
    add_special_tokens: bool
    end_ids: tuple[int, ...]
    # Generation stops at these; empty: at the model's own generation config (template).
    stop_ids: tuple[int, ...] = ()


# Stands for the reply in a rendered conversation: what the template writes after it closes
# the assistant's turn. Plain letters, so no template's filters change it.
_REPLY_MARK = "SiftReplyMark7c1e"


def prompt_shape(tokenizer: PreTrainedTokenizerBase, config: ModelConfig) -> PromptShape:
    if config.prompt_format == "chat":
        return _chat_shape(tokenizer, config.name)
    eos = tokenizer.eos_token_id
    return PromptShape(
        text=lambda prompt: config.prompt_template.format(prompt=prompt),
        add_special_tokens=True,
        end_ids=(eos,) if eos is not None else (),
    )


def _chat_shape(tokenizer: PreTrainedTokenizerBase, name: str) -> PromptShape:
    """The prompt as a user turn followed by the assistant's opener (add_generation_prompt),
    tokenized without the tokenizer's special tokens: the template writes those it wants, as
    apply_chat_template(tokenize=True) does. The response ends with what the template writes
    after the assistant's reply (SmolLM2: "<|im_end|>\n"), trailing whitespace dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model.prompt_format=chat: the tokenizer of {name!r} has no chat template; "
            "use model.prompt_format=template"
        )

    def text(prompt: str) -> str:
        turn = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True))

    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY_MARK}]
    rendered = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    _, found, after = rendered.partition(_REPLY_MARK)
    if not found:
        raise ValueError(
            f"model.prompt_format=chat: the chat template of {name!r} leaves out the "
            "assistant's reply, so a response has no place in it; use model.prompt_format=template"
        )
    end_of_turn = after.rstrip()
    if not end_of_turn:
        raise ValueError(
            f"model.prompt_format=chat: the chat template of {name!r} writes nothing after the "
            "assistant's reply, so no end-of-turn token ends a response; use "
            "model.prompt_format=template"
        )
    end_ids = tuple(tokenizer(end_of_turn, add_special_tokens=False)["input_ids"])
    return PromptShape(text, add_special_tokens=False, end_ids=end_ids, stop_ids=end_ids[:1])


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    shape: PromptShape,
    max_length: int,
) -> Encoded:
    """Prompt and response are tokenized apart so the boundary is exact, then cut to max_length."""
    prompt_ids = leading_ids(tokenizer, shape.text(prompt), max_length, shape.add_special_tokens)
    response_ids = [*leading_ids(tokenizer, response, max_length, False), *shape.end_ids]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Encoded(input_ids=input_ids, labels=labels)


def leading_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, add_special_tokens: bool
) -> list[int]:
    """The first ids of tokenizing text whole: at least its first max_length (all, if fewer).

    Tokenizing whole and cutting made transformers warn that a text past the model's context
    "will result in indexing errors", though nothing past max_length ever reaches the model.
    Truncation cuts the tokens of the whole text (never re-tokenizes), keeping room for the
    special tokens it adds: with that room added to max_length, the first max_length ids are
    the whole text's. A tokenizer that truncates on the left keeps the last tokens instead:
    its texts are tokenized whole (and may warn)."""
    if tokenizer.truncation_side != "right":
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    room = tokenizer.num_special_tokens_to_add(pair=False) if add_special_tokens else 0
    encoded = tokenizer(
        text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length + room
    )
    return list(encoded["input_ids"])


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    config: ModelConfig,
) -> list[Encoded]:
    shape = prompt_shape(tokenizer, config)
    return [
        encode_example(tokenizer, p, r, shape, config.max_length)
        for p, r in zip(prompts, responses, strict=True)
    ]


def pad_batch(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def length_sorted_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Groups indices of similar length so padding is small; each batch holds ≤ max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest member is the longest: width × rows bounds the batch.
        if current and lengths[i] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def model_fingerprint(config: ModelConfig) -> str:
    """Content hash of a local model folder, the md5 of a GGUF file, or 'hub id@revision'
    for hub models.

    Cached steps key on this, so retraining a local checkpoint in place invalidates them.
    """
    if names_gguf(config.name, config.gguf_file):
        return gguf_md5(named_checkpoint(config.name, config.gguf_file, config.revision))
    path = Path(config.name)
    if not path.is_dir():
        return f"{config.name}@{config.revision or 'main'}"
    files = sorted(p for p in path.iterdir() if p.is_file())
    return hashlib.md5("".join(f"{p.name}:{file_md5(p)}" for p in files).encode()).hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """A model to load and the fingerprint that keys every cache built from it."""

    config: ModelConfig
    fingerprint: str


def model_source(config: ModelConfig, state_dir: Path | None = None) -> ModelSource:
    """The model every step loads. A GGUF checkpoint becomes the transformers folder it is
    converted to under state_dir (the project's .sift/; steps/gguf.py), fingerprinted by
    the GGUF's md5: embed, fine-tune, evaluate and the registry see an ordinary folder, and
    lineage records the file the user named. GgufError (a ValueError) names a bad file."""
    if not names_gguf(config.name, config.gguf_file):
        return ModelSource(config, model_fingerprint(config))
    if state_dir is None:
        raise ValueError(f"model.name={config.name!r}: a GGUF model needs the state folder "
                         "to convert it into (model_source(config, state_dir))")  # fmt: skip
    checkpoint = named_checkpoint(config.name, config.gguf_file, config.revision)
    md5 = gguf_md5(checkpoint)
    folder = converted_folder(checkpoint, md5, state_dir)
    update = {"name": str(folder), "gguf_file": None, "revision": None}
    return ModelSource(config.model_copy(update=update), md5)


def trained_source(base: ModelConfig, model_dir: str) -> ModelSource:
    """A fine-tuned folder shown to the model the way `base` is (template, max_length); the
    hub revision (and a GGUF file) no longer applies. Its fingerprint is the folder's name:
    the work-folder key of everything that made it (flows/tasks.py work_dir)."""
    update = {"name": model_dir, "revision": None, "gguf_file": None}
    return ModelSource(base.model_copy(update=update), Path(model_dir).name)
