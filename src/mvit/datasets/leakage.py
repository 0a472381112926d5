"""Images shared between datasets used together, and training splits with them taken out.

The same photograph turns up in several public datasets (DermMel is built from ISIC/HAM10000
images), so one dataset's training image may be another's test image, and the test score would
measure memory. Two files are the same image when their bytes are identical or when their names
carry the same ISIC id (`ISIC_0024306`), which catches re-encoded or resized copies.
A training image is removed when its image, or any image of its group (lesion), sits in an
evaluation split of any dataset used together, its own dataset included.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from mvit.core.training_images import content_hashes, isic_id
from mvit.datasets import splits
from mvit.registry import manager
from mvit.registry.specs import Sample

@dataclass(frozen=True)
class Member:
    """One file of a dataset split."""

    dataset: str
    split: str
    path: Path


@dataclass(frozen=True)
class SharedImage:
    """One image found in more than one dataset, with how it was matched ("content", "isic_id")."""

    by: tuple[str, ...]
    isic_id: Optional[str]
    members: tuple[Member, ...]


@dataclass
class LeakageReport:
    shared: list[SharedImage] = field(default_factory=list)  # images found in more than one dataset
    excluded: list[Member] = field(default_factory=list)  # training images taken out

    def pair_counts(self) -> dict[tuple[str, str], int]:
        """(dataset, dataset) -> how many images they share."""
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for image in self.shared:
            names = sorted({member.dataset for member in image.members})
            for i, first in enumerate(names):
                for second in names[i + 1 :]:
                    counts[(first, second)] += 1
        return dict(counts)


SplitSamples = Mapping[str, Mapping[str, Sequence[Sample]]]  # dataset -> split -> samples


def _keys(datasets: SplitSamples) -> dict[tuple[str, str], list[tuple[Member, Sample]]]:
    """(by, key) -> the files carrying it, over every split of every dataset."""
    paths = [sample.path for per_split in datasets.values() for samples in per_split.values() for sample in samples]
    hashes = content_hashes(paths)
    index: dict[tuple[str, str], list[tuple[Member, Sample]]] = defaultdict(list)
    for dataset, per_split in datasets.items():
        for split, samples in per_split.items():
            for sample in samples:
                member = Member(dataset, split, sample.path)
                index[("content", hashes[sample.path])].append((member, sample))
                isic = isic_id(sample.path)
                if isic:
                    index[("isic_id", isic)].append((member, sample))
    return index


def find_shared(datasets: SplitSamples) -> list[SharedImage]:
    """Every image (by content or ISIC id) that sits in more than one of `datasets`."""
    return _shared(_keys(datasets))


def _shared(index: dict[tuple[str, str], list[tuple[Member, Sample]]]) -> list[SharedImage]:
    # files matched by bytes or by ISIC id are one image: join them (union-find), then keep the
    # images whose files span more than one dataset
    parent: dict[Member, Member] = {}

    def root(member: Member) -> Member:
        while parent.setdefault(member, member) != member:
            member = parent[member]
        return member

    for entries in index.values():
        for member, _ in entries[1:]:
            parent[root(member)] = root(entries[0][0])
    members: dict[Member, set[Member]] = defaultdict(set)
    ways: dict[Member, set[str]] = defaultdict(set)
    for (by, _), entries in index.items():
        if len(entries) > 1:
            ways[root(entries[0][0])].add(by)
        for member, _ in entries:
            members[root(member)].add(member)
    shared = []
    for top, files in members.items():
        if len({member.dataset for member in files}) > 1:
            ids = sorted(filter(None, (isic_id(member.path) for member in files)))
            ordered = tuple(sorted(files, key=lambda m: (m.dataset, m.split, str(m.path))))
            shared.append(SharedImage(by=tuple(sorted(ways[top])), isic_id=ids[0] if ids else None, members=ordered))
    return sorted(shared, key=lambda image: [str(m.path) for m in image.members])


def exclude_shared(
    datasets: SplitSamples, *, training: Union[str, Mapping[str, str], None] = None
) -> tuple[dict[str, dict[str, list[Sample]]], LeakageReport]:
    """`datasets` with every training image that leaks into an evaluation split taken out.

    `training` names each dataset's training split: one name for all, a mapping dataset -> name, or
    None for the plugin contract's: the first split of each dataset's mapping (`splits.split_samples`
    lists them in the order of the dataset's `splits`, the training split first).
    Returns the same dataset -> split -> samples mapping (evaluation splits untouched) and a report
    of the shared images and the training images removed.
    """
    if training is None:
        training_of = {dataset: next(iter(per_split), None) for dataset, per_split in datasets.items()}
    elif isinstance(training, str):
        training_of = dict.fromkeys(datasets, training)
    else:
        training_of = dict(training)
    index = _keys(datasets)
    leaking: set[tuple[str, str]] = set()  # (dataset, group) of training images seen in an evaluation split

    def is_training(member: Member) -> bool:
        return member.split == training_of.get(member.dataset)

    for entries in index.values():
        if any(not is_training(member) for member, _ in entries):
            leaking |= {(member.dataset, sample.group) for member, sample in entries if is_training(member)}
    report = LeakageReport(shared=_shared(index))
    cleaned: dict[str, dict[str, list[Sample]]] = {}
    for dataset, per_split in datasets.items():
        cleaned[dataset] = {}
        for split, samples in per_split.items():
            kept = list(samples)
            if split == training_of.get(dataset):
                kept = [s for s in samples if (dataset, s.group) not in leaking]
                report.excluded += [Member(dataset, split, s.path) for s in samples if (dataset, s.group) in leaking]
            cleaned[dataset][split] = kept
    return cleaned, report


def leak_free_splits(
    roots: Mapping[str, Path | str],
    *,
    seed: int = splits.DEFAULT_SEED,
    fold: Optional[int] = None,
    folds: int = splits.DEFAULT_FOLDS,
) -> tuple[dict[str, dict[str, list[Sample]]], LeakageReport]:
    """Load and split each dataset (name -> root folder), then take leaking images out of training.

    `fold` applies to the datasets without official splits; those with them keep their own.
    """
    per_dataset = {}
    for name, root in roots.items():
        own_fold = None if manager.get_dataset(name).official_splits else fold
        per_dataset[name] = splits.split_dataset(name, root, seed=seed, fold=own_fold, folds=folds)
    return exclude_shared(per_dataset, training={name: splits.training_split(manager.get_dataset(name)) for name in roots})
