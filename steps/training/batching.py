"""Batches for fine-tuning: a resumable length-grouped sampler and a padding-counting collator.

The sampler's order is a pure function of (seed, epoch), so a run resumed from a checkpoint
sees exactly the batches the interrupted run would have seen (Trainer skips the batches of
the resumed epoch that were already trained on, then calls `set_epoch` for later epochs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from steps.modeling import Encoded, pad_batch

# Examples are sorted by length within windows of this many batches: larger windows mean
# less padding but batches less random (the same idea as transformers' LengthGroupedSampler).
MEGABATCH_BATCHES = 50


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Encoded]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        e = self.examples[index]
        return {"input_ids": e.input_ids, "labels": e.labels}


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices; with group_by_length, consecutive batch_size runs have similar length.

    Full batches come in random order, the one short batch (if any) last, so that batch
    boundaries stay aligned when accelerate deals batches out to several processes.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return iter(order)
        window = self.batch_size * MEGABATCH_BATCHES
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped += sorted(order[start : start + window], key=lambda i: -self.lengths[i])
        batches = [
            grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)
        ]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([i for batch in shuffled + tail for i in batch])


class PaddingCollator:
    """Right-pads a batch (steps.modeling.pad_batch) and counts real vs padded positions."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([Encoded(f["input_ids"], f["labels"]) for f in features], self.pad_id)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["attention_mask"].numel()
        return batch

    @property
    def padding_fraction(self) -> float:
        """Share of the positions the model computed on that were padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
