"""What a run trains on: each dataset's splits, with leakage kept out, and every sample's class per head.

A dataset names its own splits (the plugin contract: the first of `DatasetSpec.splits` is the
training split); a run uses two of them, by role: TRAIN and VALID (`datasets.splits.validation_split`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from mvit.data.mixing import IGNORE
from mvit.errors import ConfigError, DatasetError, MvitError, PluginError
from mvit.datasets import folder, leakage, splits
from mvit.registry import manager
from mvit.datasets.records import class_indices
from mvit.registry.specs import Sample
from mvit.train.config import TrainConfig

TRAIN, VALID = "train", "valid"  # roles, not split names: each dataset's names are in `Task.roles`


@dataclass
class Task:
    """One dataset of the run: its splits and, for each of its heads, every sample's class."""

    dataset: str
    heads: list[str]
    splits: dict[str, list[Sample]]  # the dataset's own split names -> samples
    targets: dict[str, Tensor]  # split -> (N, len(heads)) class indices, IGNORE where a head leaves a sample out
    roles: dict[str, str]  # TRAIN / VALID -> the name of the dataset's split in that role

    def samples(self, role: str) -> list[Sample]:
        return self.splits[self.roles[role]]

    def labels(self, role: str) -> Tensor:
        """(N, len(heads)) class indices of the split in `role`."""
        return self.targets[self.roles[role]]

    def paths(self, role: str) -> list[Path]:
        return [sample.path for sample in self.samples(role)]


def build_tasks(config: TrainConfig, say: Callable[[str], None]) -> list[Task]:
    """Load and split every dataset, and keep images shared between datasets out of training."""
    register_own_datasets(config)  # before anything looks a dataset up
    check_heads(config, say)  # before any dataset is read
    per_dataset, heads, roles = {}, {}, {}
    for i, entry in enumerate(config.datasets):
        spec = manager.get_dataset(entry.name)
        validation = splits.validation_split(spec)
        if validation is None:
            raise ConfigError(f"dataset {entry.name} has no split to validate on (its splits: {', '.join(spec.splits)}); "
                              f"training needs a split named \"valid\", or a second split before the test split")
        roles[entry.name] = {TRAIN: splits.training_split(spec), VALID: validation}
        fold = None if spec.official_splits else entry.fold
        try:
            per_dataset[entry.name] = splits.split_dataset(
                entry.name, entry.root, seed=entry.split_seed, fold=fold, folds=entry.folds, fractions=entry.fractions
            )
        except DatasetError as error:  # say where a run's root comes from, so the user knows what to change
            raise DatasetError(
                f"{error} (this root is datasets.{i}.root in the config; change it there or with --set datasets.{i}.root=DIR)"
            ) from None
        offered = [head.name for head in manager.registry().heads_of(entry.name)]
        heads[entry.name] = entry.heads or offered
    cleaned, report = leakage.exclude_shared(per_dataset, training={name: r[TRAIN] for name, r in roles.items()})
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
        for role in (TRAIN, VALID):
            split = roles[entry.name][role]
            if not kept.get(split):
                raise ConfigError(f"dataset {entry.name} has no images in its {split} split; check its root and split settings")
        tasks.append(Task(entry.name, heads[entry.name], kept, targets, roles[entry.name]))
    return tasks


def register_own_datasets(config: TrainConfig) -> None:
    """The config's own folders and CSV files (`[datasets.folder]`) as datasets of this process's
    registry. Here, where every run and `mvit extract` start, in each of torchrun's processes (each
    has its own registry) and again at a resume, which reads them from the run's config."""
    for i, entry in enumerate(config.datasets):
        if entry.folder is None:
            continue
        try:
            folder.register(folder.own_dataset(entry.name, entry.root, classes=entry.folder.classes,
                                               positive=entry.folder.positive, diagnoses=entry.folder.diagnoses))
        except MvitError as error:  # say which dataset of the config, so the user knows what to change
            raise type(error)(f"datasets.{i} ({entry.name}, your own dataset at {entry.root}): {error}") from None


def check_heads(config: TrainConfig, say: Callable[[str], None]) -> None:
    """Every dataset trains the heads it should: a head its plugin registered but loading skipped (a
    label_map typo, say) stops the run, unless the config lists the heads to train without it."""
    registry = manager.registry()
    for i, entry in enumerate(config.datasets):
        manager.get_dataset(entry.name)  # an unknown or skipped dataset: one sentence saying which and why
        lost = registry.lost_heads(entry.name)
        for name in entry.heads:
            if name in lost:
                raise PluginError(f"datasets.{i}.heads asks for head {name!r}, which is installed but skipped: "
                                  f"{lost[name]}; fix the plugin, or take {name!r} out of datasets.{i}.heads")
            if manager.get_head(name).dataset != entry.name:
                raise ConfigError(f"head {name!r} belongs to dataset {manager.get_head(name).dataset!r}, not {entry.name!r}")
        if lost and not entry.heads:
            what = ", and ".join(f"head {name!r}, as {reason}" for name, reason in sorted(lost.items()))
            usable = [head.name for head in registry.heads_of(entry.name)]
            example = f" (e.g. heads = {json.dumps(usable)})" if usable else ""
            raise PluginError(
                f"dataset {entry.name!r} lost {'a head' if len(lost) == 1 else f'{len(lost)} heads'} to a plugin "
                f"problem, which this run would leave out: {what}; fix the plugin, or list the heads to train "
                f"in datasets.{i}.heads{example}")
        for name, reason in sorted(lost.items()):
            if entry.heads:
                say(f"warning: head {name!r} of dataset {entry.name!r} is left out of this run: {reason}")


def check_validation(tasks: list[Task]) -> None:
    """Before the first epoch (and at a resume): every head has validation images, and each binary
    head, whose decision threshold the end of the run calibrates, has both of its classes among them."""
    for task in tasks:
        split = task.roles[VALID]
        for h, name in enumerate(task.heads):
            head = manager.get_head(name)
            targets = task.labels(VALID)[:, h]
            present = targets[targets != IGNORE]
            if len(present) == 0:
                raise ConfigError(
                    f"head {name} has no images in the {split} split of dataset {task.dataset}, so it can be neither "
                    f"validated nor calibrated; add labelled images to that split (or change split_seed or fractions)")
            if len(head.classes) == 2 and head.positive is not None:
                positive = head.classes.index(head.positive)
                for cls, count in ((head.positive, int((present == positive).sum())),
                                   (head.classes[1 - positive], int((present != positive).sum()))):
                    if count == 0:
                        raise ConfigError(
                            f"head {name} has no {cls} image in the {split} split of dataset {task.dataset} "
                            f"({len(present)} images), so its decision threshold cannot be calibrated; give that split "
                            f"images of both classes (more images, another split_seed, or other split fractions)")
