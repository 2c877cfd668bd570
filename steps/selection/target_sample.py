"""select.target's sample: its prompts read, embedded and handed to `fisher-target`.

The math is steps/selection/targeted.py. The sample is prompts only (no responses), read
with the pool's data.prompt_field and data.chat_template; its states come from the pool's
embed pass (same model, settings and sketch), taken at every templated prompt position after
the first (`encode_target` says why), so they live in the pool's feature space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from transformers import PreTrainedTokenizerBase

from steps.data.fields import chat_renderer, column_values
from steps.data.ingest import IngestConfig
from steps.data.readers import iter_local
from steps.data.sources import allowed_roots, resolve_local
from steps.modeling import (
    IGNORE_INDEX,
    Encoded,
    ModelConfig,
    PromptShape,
    leading_ids,
    load_model,
    load_tokenizer,
    prompt_shape,
)
from steps.selection.embedding.embed import EmbedConfig, FeaturesRef, embed_encoded, load_pool
from steps.selection.pool import FeaturePool
from steps.selection.targeted import target_rows


class SelectConfigLike(Protocol):
    """The two select fields read here (select.SelectConfig; it imports this module)."""

    @property
    def selector(self) -> str: ...

    @property
    def target(self) -> str: ...


def target_mismatch(selector: str, target: str) -> str | None:
    """Why select.selector and select.target do not go together, or None when they do."""
    if selector == "fisher-target" and not target:
        return (
            "select.selector=fisher-target needs select.target: a file of prompts from the "
            "distribution to serve"
        )
    if target and selector != "fisher-target":
        return (
            f"select.target={target} is read only by select.selector=fisher-target, not by "
            f"{selector}: set select.target='' or select.selector=fisher-target"
        )
    return None


def embed_targets(
    prompts: list[str],
    model_config: ModelConfig,
    config: EmbedConfig,
    out_dir: Path,
    device: str,
    precision: str,
) -> FeaturesRef:
    """The states of a target sample's prompts (select.target), as the pool's statistics.

    The same pass, settings and sketch as embed_pool, over each templated prompt encoded by
    `encode_target`: every prompt position after the first counts as loss-bearing, so each
    prompt's factor sums x xᵀ over those states. One process (a sample is small).
    """
    tokenizer = load_tokenizer(model_config)
    shape = prompt_shape(tokenizer, model_config)
    max_length = model_config.max_length
    encoded = [encode_target(tokenizer, prompt, shape, max_length) for prompt in prompts]
    short = [i for i, e in enumerate(encoded) if e.n_loss_tokens == 0]
    if short:
        raise ValueError(
            f"select.target: {len(short)} prompt(s) tokenise to a single token, e.g. row "
            f"{short[0]}: they have no state past the first"
        )
    model = load_model(model_config, device).eval()
    one_process = config.model_copy(update={"num_processes": 1})
    pad_id = tokenizer.pad_token_id
    return embed_encoded(model, encoded, pad_id, one_process, out_dir, device, precision)


def encode_target(
    tokenizer: PreTrainedTokenizerBase, prompt: str, shape: PromptShape, max_length: int
) -> Encoded:
    """A templated prompt whose states at positions 1..T-1 are all "loss-bearing".

    Position t's state predicts token t+1 (embed_stats), so one token (EOS, any would do:
    causal attention keeps it out of every earlier state) follows the prompt, giving the last
    prompt position, the one that predicts the response's first token, a label too. Every
    position rather than the last alone: the last is the template's fixed ending
    ("Answer: "), nearly one state for every prompt, while the others carry the prompt's
    content. The first is left out: a state after one token (often BOS) says nothing of
    the prompt. The labels' values reach only base_loss, which fisher-target never reads.
    """
    text = shape.text(prompt)
    prompt_ids = leading_ids(tokenizer, text, max_length, shape.add_special_tokens)
    prompt_ids = prompt_ids[: max_length - 1]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    input_ids = [*prompt_ids, int(end)]
    return Encoded(input_ids=input_ids, labels=[IGNORE_INDEX, IGNORE_INDEX, *input_ids[2:]])


def target_states_for(
    selector: str, setting: str, target: FeaturesRef | None, pool: FeaturePool
) -> NDArray[np.float32] | None:
    """What select() gets as target=: fisher-target's rows (targeted.target_rows) of the
    embedded sample, checked against the pool's width; None for every other selector.

    setting: select.target's value, for errors.
    """
    if selector != "fisher-target":
        if target is not None:
            raise ValueError(f"target features given, but select.selector={selector}")
        return None
    if target is None:
        raise ValueError(
            f"select.selector=fisher-target: select.target={setting!r} was not embedded "
            "(no target features passed to select_subset)"
        )
    states = load_pool(target)
    if states.d != pool.d:
        raise ValueError(
            f"select.target={setting!r}: its states are {states.d} wide but the pool's "
            f"are {pool.d}; embed both with the same model and embed settings"
        )
    return target_rows(states)


def read_target_prompts(data: IngestConfig, target: str, project_dir: Path) -> list[str]:
    """select.target's prompts, mapped by data.prompt_field and data.chat_template as the
    pool's are (no response field needed); relative paths are from project_dir."""
    if data.text_field is not None:
        raise ValueError(
            f"select.target needs prompts, but data.text_field={data.text_field!r} makes the "
            "pool plain text with empty prompts"
        )
    path = resolve_local(target, project_dir)
    if path is None:
        raise ValueError(f"select.target={target!r} is not a local file")
    render = chat_renderer(data.chat_template)
    prompts: list[str] = []
    roots = [*allowed_roots(data, project_dir), path.resolve()]  # as `sift select --data`
    for batch in iter_local(path, roots, "select.target"):
        values = column_values(batch, "data.prompt_field", data.prompt_field, target)
        for place, value in zip(batch.where, values, strict=True):
            if value is None:
                raise ValueError(f"select.target={target!r}: {place} has a null prompt")
            prompts.append(value if render is None else render(value))
    if not prompts:
        raise ValueError(f"select.target={target!r} holds no prompts")
    return prompts


def reject_target_in_pipeline(config: SelectConfigLike) -> None:
    """`sift run` does not embed a target sample yet: fisher-target runs in `sift select`."""
    if config.target or config.selector == "fisher-target":
        raise ValueError(
            f"select.selector={config.selector} with select.target={config.target!r}: the "
            "pipeline does not embed a target sample yet; run fisher-target with `sift "
            "select` (steps.selection.select.select_from_file)"
        )
