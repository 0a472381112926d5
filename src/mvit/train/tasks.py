"""What a run trains on: each dataset's splits, with leakage kept out, and every sample's class per head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from mvit.data.mixing import IGNORE
from mvit.errors import ConfigError
from mvit.registry import leakage, manager, splits
from mvit.registry.records import class_indices
from mvit.registry.specs import Sample
from mvit.train.config import TrainConfig

TRAIN, VALID = "train", "valid"


@dataclass
class Task:
    """One dataset of the run: its splits and, for each of its heads, every sample's class."""

    dataset: str
    heads: list[str]
    splits: dict[str, list[Sample]]
    targets: dict[str, Tensor]  # split -> (N, len(heads)) class indices, IGNORE where a head leaves a sample out

    def paths(self, split: str) -> list[Path]:
        return [sample.path for sample in self.splits[split]]


def build_tasks(config: TrainConfig, say: Callable[[str], None]) -> list[Task]:
    """Load and split every dataset, and keep images shared between datasets out of training."""
    per_dataset, heads = {}, {}
    for entry in config.datasets:
        spec = manager.get_dataset(entry.name)
        fold = None if spec.official_splits else entry.fold
        per_dataset[entry.name] = splits.split_dataset(
            entry.name, entry.root, seed=entry.split_seed, fold=fold, folds=entry.folds, fractions=entry.fractions
        )
        offered = [head.name for head in manager.registry().heads_of(entry.name)]
        for name in entry.heads:
            if manager.get_head(name).dataset != entry.name:
                raise ConfigError(f"head {name!r} belongs to dataset {manager.get_head(name).dataset!r}, not {entry.name!r}")
        heads[entry.name] = entry.heads or offered
    cleaned, report = leakage.exclude_shared(per_dataset, training=TRAIN)
    if report.excluded:
        say(f"kept {len(report.excluded)} training images out: the same image is in an evaluation split")
    tasks = []
    for entry in config.datasets:
        specs = [manager.get_head(name) for name in heads[entry.name]]
        targets, kept = {}, {}
        for split, samples in cleaned[entry.name].items():
            per_head = [class_indices(spec, samples) for spec in specs]  # (heads, N), None where left out
            rows = [[IGNORE if index is None else index for index in row] for row in zip(*per_head)]  # (N, heads)
            used = [i for i, row in enumerate(rows) if any(t != IGNORE for t in row)]
            kept[split] = [samples[i] for i in used]
            targets[split] = torch.tensor([rows[i] for i in used], dtype=torch.long).reshape(len(used), len(specs))
        for split in (TRAIN, VALID):
            if not kept.get(split):
                raise ConfigError(f"dataset {entry.name} has no images in its {split} split; check its root and split settings")
        tasks.append(Task(entry.name, heads[entry.name], kept, targets))
    return tasks

