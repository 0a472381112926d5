"""Which images go into which batch: class-balanced batches, and datasets interleaved in an epoch.

Balanced batches keep a 9:1 dataset from swinging the model to the majority class: every batch
holds each class about equally often. Within a class, images are drawn without replacement and
reshuffled when used up, so a rare class cycles through all its images instead of repeating a few.
Everything is derived from a seeded generator, so an epoch's batches are the same after a resume.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def balanced_batches(targets: Sequence[int], batch_size: int, num_batches: int, generator: torch.Generator) -> list[list[int]]:
    """`num_batches` batches of indices into `targets`, each with every class equally represented."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    classes = sorted(by_class)
    queues = {c: [] for c in classes}

    def draw(c: int) -> int:
        if not queues[c]:
            order = torch.randperm(len(by_class[c]), generator=generator).tolist()
            queues[c] = [by_class[c][i] for i in order]
        return queues[c].pop()

    batches = []
    for _ in range(num_batches):
        # each class gets batch_size // K places; the remainder goes to randomly chosen classes
        share, extra = divmod(batch_size, len(classes))
        lucky = set(torch.randperm(len(classes), generator=generator)[:extra].tolist())
        batch = [draw(c) for k, c in enumerate(classes) for _ in range(share + (k in lucky))]
        order = torch.randperm(len(batch), generator=generator).tolist()
        batches.append([batch[i] for i in order])
    return batches


def shuffled_batches(size: int, batch_size: int, num_batches: int, generator: torch.Generator) -> list[list[int]]:
    """Plain shuffled batches (no balancing), cycling through the data as often as needed."""
    indices: list[int] = []
    while len(indices) < num_batches * batch_size:
        indices += torch.randperm(size, generator=generator).tolist()
    return [indices[k * batch_size : (k + 1) * batch_size] for k in range(num_batches)]


def batches_per_dataset(sizes: Sequence[int], batch_size: int, weighting: str) -> list[int]:
    """How many batches each dataset gives per epoch. The epoch is as long as one pass over all data;
    `weighting` shares it out by size, by the square root of size (small datasets not starved,
    large ones not drowned), or equally."""
    total = sum(math.ceil(size / batch_size) for size in sizes)
    weights = {"size": list(sizes), "sqrt": [math.sqrt(s) for s in sizes], "equal": [1.0] * len(sizes)}[weighting]
    return [max(1, round(total * w / sum(weights))) for w in weights]


def interleave(counts: Sequence[int]) -> list[int]:
    """The dataset of each step, spreading every dataset's batches evenly over the epoch.

    Batch j of dataset i sits at (j + 0.5) / counts[i] of the way through the epoch.
    """
    steps = [((j + 0.5) / count, i) for i, count in enumerate(counts) for j in range(count)]
    return [i for _, i in sorted(steps)]
