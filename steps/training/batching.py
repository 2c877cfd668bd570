"""Batches for fine-tuning: resumable length-grouped samplers and a padding-counting collator.

Both samplers' orders are pure functions of (seed, epoch), so a run resumed from a checkpoint
sees exactly the batches the interrupted run would have seen (Trainer skips the batches of
the resumed epoch that were already trained on, then calls `set_epoch` for later epochs).
`EpochSampler` yields indices that Trainer cuts into batch_size batches; `StepsBatchSampler`
(finetune.steps) yields whole batches: one pass in a fixed number of near-equal batches.
"""

from __future__ import annotations

import itertools
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
        generator, order = _epoch_order(len(self.lengths), self.seed, self.epoch)
        if not self.group_by_length:
            return iter(order)
        window = self.batch_size * MEGABATCH_BATCHES
        bounds = [*range(0, len(order), window), len(order)]
        grouped = _longest_first(order, self.lengths, bounds)
        batches = [
            grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)
        ]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([i for batch in shuffled + tail for i in batch])


class StepsBatchSampler(torch.utils.data.Sampler[list[int]]):
    """One pass over the examples in exactly `batches` batches whose sizes differ by at most 1.

    finetune.steps: arms of a study at an equal token budget train the same number of optimiser
    steps whether they picked few long examples or many short ones. The order is EpochSampler's
    idea: a seeded shuffle; with group_by_length, examples sorted longest first within windows
    of MEGABATCH_BATCHES batches and the batches then shuffled.
    """

    def __init__(self, lengths: list[int], batches: int, seed: int, group_by_length: bool):
        if not 1 <= batches <= len(lengths):
            raise ValueError(
                f"finetune.steps: {batches} batches of one example or more need at least "
                f"{batches} examples, but {len(lengths)} are selected"
            )
        self.lengths = lengths
        self.batches = batches
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def sizes(self) -> list[int]:
        """The batch sizes in cut order: the n mod batches larger ones first."""
        whole, extra = divmod(len(self.lengths), self.batches)
        return [whole + 1] * extra + [whole] * (self.batches - extra)

    def __iter__(self) -> Iterator[list[int]]:
        generator, order = _epoch_order(len(self.lengths), self.seed, self.epoch)
        ends = list(itertools.accumulate(self.sizes()))
        starts = [0, *ends[:-1]]
        if self.group_by_length:
            bounds = [*starts[::MEGABATCH_BATCHES], len(order)]  # windows on batch boundaries
            order = _longest_first(order, self.lengths, bounds)
        batches = [order[a:b] for a, b in zip(starts, ends, strict=True)]
        if self.group_by_length:  # else the order is random already
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        return iter(batches)


def _epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Generator, list[int]]:
    """Both samplers' shuffle: a permutation of range(n) that depends only on (seed, epoch),
    and the generator that drew it (for the batch shuffle that follows)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return generator, torch.randperm(n, generator=generator).tolist()


def _longest_first(order: list[int], lengths: list[int], bounds: list[int]) -> list[int]:
    """`order` with each window order[bounds[w]:bounds[w+1]] sorted by length, longest first."""
    grouped: list[int] = []
    for start, end in itertools.pairwise(bounds):
        grouped += sorted(order[start:end], key=lambda i: -lengths[i])
    return grouped


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
