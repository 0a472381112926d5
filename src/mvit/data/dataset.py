"""Labelled images as tensors for training and evaluation."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from mvit.data.images import load_image
from mvit.registry.specs import Sample


class LabelledImages(Dataset):
    """(sample, class index) pairs -> (image (3, S, S), class index, position in the list)."""

    def __init__(self, items: Sequence[tuple[Sample, int]], transform: Callable):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.items]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        sample, target = self.items[index]
        return self.transform(load_image(sample.path)), target, index
