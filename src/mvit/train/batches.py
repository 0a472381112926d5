"""What each step trains on: the epoch's plan of batches (class-balanced, datasets interleaved,
shared out between processes), decoded image batches, and backbone features from the feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from mvit.data.dataset import BadImages, ImageBatch, image_loader
from mvit.data.features import FeatureCache
from mvit.data.sampling import balanced_batches, batches_per_dataset, interleave, shuffled_batches
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import train_transform
from mvit.core.model import Model
from mvit.train.config import TrainConfig
from mvit.runtime.distributed import Processes
from mvit.runtime.options import loader_workers
from mvit.train.tasks import TRAIN, Task


def epoch_steps(tasks: list[Task], config: TrainConfig, epoch: int, processes: Processes) -> list[tuple[int, list[int]]]:
    """This process's steps of `epoch`: (task index, sample indices), the same after a resume."""
    t = config.training
    generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
    sizes = [len(task.samples(TRAIN)) for task in tasks]
    counts = batches_per_dataset(sizes, t.batch_size, t.dataset_weighting)
    batches = [
        balanced_batches(task.labels(TRAIN)[:, 0].tolist(), t.batch_size, count, generator)
        if t.balanced
        else shuffled_batches(len(task.samples(TRAIN)), t.batch_size, count, generator)
        for task, count in zip(tasks, counts)
    ]
    taken = [0] * len(tasks)
    steps = []
    for i in interleave(counts):
        steps.append((i, batches[i][taken[i]]))
        taken[i] += 1
    steps = steps[: len(steps) // processes.world * processes.world]  # every rank takes the same number of steps
    return [steps[k] for k in processes.shard(len(steps))]


def decoding_workers(config: TrainConfig, count: int, device: torch.device, processes: int) -> int:
    """The config's `workers`, or for "auto" the loader's choice for `count` images per process."""
    workers = config.runtime.workers
    return loader_workers(count, config.training.batch_size, device, processes) if workers == "auto" else workers


def training_batches(tasks: list[Task], steps: list[tuple[int, list[int]]], config: TrainConfig, device: torch.device, *,
                     workers: Callable[[int], int], features: Optional[SplitFeatures] = None,
                     bad_images: Optional[BadImages] = None) -> Iterator[tuple[Task, Tensor, Tensor]]:
    """Each step's task, inputs and targets (B, heads), on the device: the backbone's cached features
    (B, D) where `features` is given (a frozen backbone, no augmentation), else augmented images
    (B, 3, H, W) (`workers`: decoding processes for a number of images). The features are loaded, or
    the loaders started, here: before the first step. An unreadable image stops the run with its
    sentence, or (`bad_images` "skip") is left out of its batch; a batch left empty is skipped."""
    bad_images = bad_images or BadImages("stop")
    if features is not None:
        inputs = [features.get(task, TRAIN, all_ranks=True) for task in tasks]  # (N, D) each, NaN rows: skipped images
        return _steps_from_features(tasks, steps, inputs, device)
    transform = train_transform(config.preprocessing, config.augmentation)
    loaders = []
    for k, task in enumerate(tasks):
        batches = [batch for i, batch in steps if i == k]
        count = sum(len(batch) for batch in batches)
        loaders.append(decoded_batches(task.paths(TRAIN), transform, batches, workers=workers(count), device=device,
                                     bad_images=bad_images))
    return _steps_from_images(tasks, steps, loaders, device)


def _steps_from_features(tasks, steps, features: list[Tensor], device) -> Iterator[tuple[Task, Tensor, Tensor]]:
    decoded = [torch.isfinite(f).all(dim=1) for f in features]  # (N,) False for images skipped as unreadable
    for k, batch in steps:
        task = tasks[k]
        batch = [i for i in batch if decoded[k][i]]
        if batch:
            yield task, features[k][batch].to(device, non_blocking=True), task.labels(TRAIN)[batch].to(device, non_blocking=True)


def _steps_from_images(tasks, steps, loaders: list[Iterator[ImageBatch]], device) -> Iterator[tuple[Task, Tensor, Tensor]]:
    for k, _ in steps:
        task, decoded = tasks[k], next(loaders[k])
        if decoded.images is None:  # every image of the batch was skipped as unreadable
            continue
        targets = task.labels(TRAIN)[decoded.positions]
        yield task, decoded.images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def decoded_batches(paths: list[Path], transform: Callable, batches: list[list[int]], *, workers: int,
                  device: torch.device, bad_images: Optional[BadImages] = None) -> Iterator[ImageBatch]:
    """Decoded batches of `paths` as `batches` lists them; an unreadable image stops the run with its
    sentence, or (`bad_images` "skip") is left out of its batch."""
    loader = image_loader(paths, transform, batch_sampler=batches, workers=workers, device=device)
    return (bad_images or BadImages("stop")).apply(loader, paths)


class SplitFeatures:
    """Backbone features (N, D) of whole splits, from the feature cache, and kept in memory until
    `clear` (call it when the backbone changes)."""

    def __init__(self, cache: FeatureCache, model: Model, preprocessing: Preprocessing, device: torch.device,
                 dtype: torch.dtype, processes: Processes, *, workers: Callable[[int], int]):
        self.cache, self.model, self.preprocessing = cache, model, preprocessing
        self.device, self.dtype, self.processes, self.workers = device, dtype, processes, workers
        self._kept: dict[tuple[str, str], Tensor] = {}  # (dataset, split) -> (N, D)

    def clear(self) -> None:
        self._kept.clear()

    def get(self, task: Task, split: str, *, all_ranks: bool) -> Tensor:
        """`all_ranks`: every rank is here, so they share the extraction and wait for each other."""
        if (task.dataset, split) in self._kept:  # the backbone has not changed since
            return self._kept[task.dataset, split]
        paths = task.paths(split)
        options = dict(device=self.device, dtype=self.dtype, workers=self.workers(len(paths)))
        backbone, preprocessing = self.model.backbone, self.preprocessing
        if all_ranks and self.processes.world > 1:
            self.cache.extract(backbone, preprocessing, paths, processes=self.processes, **options)
            self.processes.barrier()
        features = self.cache.load(backbone, preprocessing, paths, **options)
        self._kept[task.dataset, split] = features
        return features
