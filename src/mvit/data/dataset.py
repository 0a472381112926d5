"""One image Dataset and one loader for every pass over images: training, the feature cache,
prediction, evaluation and the out-of-distribution gate.

A bad image comes back as its error sentence instead of being raised: raised inside a worker
process it would reach the user wrapped in that worker's traceback, and it would take the rest of
its batch down with it. Each caller chooses what an error means: prediction reports it for that
image and goes on; training and the feature cache follow the run's `BadImages` policy: stop with the
sentence, or skip the image and count it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mvit.data.images import as_rgb_image
from mvit.errors import ImageError

SingleImage = Union[str, Path, Image.Image, np.ndarray, Tensor]
ImageInput = Union[SingleImage, Sequence[SingleImage]]


class ImageDataset(Dataset):
    """Images (paths, PIL images, arrays or tensors) -> (position, image (3, S, S) or None, error or None)."""

    def __init__(self, items: Sequence[SingleImage], transform: Callable[[Image.Image], Tensor]):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Optional[Tensor], Optional[str]]:
        try:
            return index, self.transform(as_rgb_image(self.items[index])), None
        except ImageError as error:
            return index, None, str(error)


@dataclass
class ImageBatch:
    """What the loader yields: the decoded images and where they sit in the input, plus the errors."""

    positions: list[int]  # (b,) positions in the input of the decoded images, in order
    images: Optional[Tensor]  # (b, 3, S, S), None when no image of the batch decoded
    errors: dict[int, str]  # input position -> the sentence saying why it did not decode


def collate(batch: list[tuple[int, Optional[Tensor], Optional[str]]]) -> ImageBatch:
    decoded = [(index, image) for index, image, _ in batch if image is not None]
    images = torch.stack([image for _, image in decoded]) if decoded else None
    errors = {index: error for index, _, error in batch if error is not None}
    return ImageBatch([index for index, _ in decoded], images, errors)


def image_loader(
    items: Sequence[SingleImage],
    transform: Callable[[Image.Image], Tensor],
    *,
    workers: int,
    device: Union[str, torch.device] = "cpu",
    batch_size: Optional[int] = None,
    batch_sampler: Optional[Iterable[list[int]]] = None,
) -> DataLoader:
    """Batches of `items` in order (`batch_size`) or as `batch_sampler` lists them, decoded in
    `workers` processes with a bounded read-ahead, so memory does not grow with the file count."""
    return DataLoader(
        ImageDataset(items, transform),
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def raise_errors(batches: Iterable[ImageBatch]) -> Iterator[ImageBatch]:
    """The batches, stopping at the first image that did not decode with its sentence."""
    for batch in batches:
        if batch.errors:
            raise ImageError(next(iter(batch.errors.values())))
        yield batch


class BadImages:
    """What a pass over a run's images does with one that does not decode (`policy`): "stop" with
    its sentence, or "skip" it: the batch goes on without it, and it is remembered (`skipped`:
    path -> sentence) so the caller can report the count. Applied in the main process to the
    errors the loader's workers return, so it holds whatever the worker count."""

    def __init__(self, policy: str = "stop"):
        if policy not in ("stop", "skip"):
            raise ValueError(f"bad image policy must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.skipped: dict[str, str] = {}

    def apply(self, batches: Iterable[ImageBatch], items: Sequence[SingleImage]) -> Iterator[ImageBatch]:
        """The batches of the loader over `items`, each without its undecodable images (or stop at the first)."""
        for batch in batches:
            if batch.errors:
                if self.policy == "stop":
                    raise ImageError(next(iter(batch.errors.values())))
                for position, message in batch.errors.items():
                    self.skipped.setdefault(str(items[position]), message)
            yield batch

    def summary(self) -> str:
        """One sentence on what was left out so far ("" when nothing was)."""
        if not self.skipped:
            return ""
        count = len(self.skipped)
        return (f"left out {count} unreadable image{'s' if count != 1 else ''} (runtime.bad_images = \"skip\"); "
                f"the first: {next(iter(self.skipped.values()))}")
