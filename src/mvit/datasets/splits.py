"""Deterministic train / valid / test splits and k-fold cross-validation, grouped and stratified.

A dataset with official splits keeps them. Any other is split by `Sample.group` (every image of a
lesion lands in one split, so a model is never tested on a lesion it trained on), stratified by
label so each split has the class balance of the whole. Groups are ordered by a hash of the seed and
the group id rather than by a shuffled list: the result does not depend on the order the loader
returned the samples in, nor on Python's hash seed, and is the same on every machine.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

from mvit.errors import ConfigError, PluginError
from mvit.registry import manager
from mvit.datasets.records import load_samples
from mvit.registry.words import count
from mvit.registry.specs import DatasetSpec, Sample

DEFAULT_SEED = 0
DEFAULT_FOLDS = 5


def split_samples(
    samples: Sequence[Sample],
    spec: DatasetSpec,
    *,
    seed: int = DEFAULT_SEED,
    fold: Optional[int] = None,
    folds: int = DEFAULT_FOLDS,
    fractions: Optional[Mapping[str, float]] = None,
) -> dict[str, list[Sample]]:
    """Split name -> its samples (with `Sample.split` filled in), for every split of `spec`.

    With `fold` (0 .. folds-1), the dataset's last split (test) is that fold of a k-fold partition,
    and the other splits divide the remaining folds in their `fractions` proportions.
    Augmented copies (`meta["augmented"]`) are left out of every split but the first (training).
    """
    if spec.official_splits:
        if fold is not None:
            raise ConfigError(
                f"{spec.name} comes with official splits, so it has no cross-validation folds; leave out the fold"
            )
        _check_official(samples, spec)
        split_of = {}
    else:
        wanted = _checked_fractions(spec, fractions)
        if fold is None:
            split_of = assign_splits(samples, wanted, seed=seed)
        else:
            split_of = _cross_validation(samples, spec, wanted, seed=seed, fold=fold, folds=folds)
    training = spec.splits[0]
    result: dict[str, list[Sample]] = {name: [] for name in spec.splits}
    for sample in samples:
        split = sample.split if spec.official_splits else split_of[sample.group]
        if split != training and sample.meta.get("augmented"):
            continue  # an augmented copy of an image would inflate an evaluation score
        result[split].append(sample if sample.split == split else sample.model_copy(update={"split": split}))
    return result


def training_split(spec: DatasetSpec) -> str:
    """The split a model trains on: the first of the dataset's `splits` (the plugin contract)."""
    return spec.splits[0]


def validation_split(spec: DatasetSpec) -> Optional[str]:
    """The split training validates on (model selection and calibration): the evaluation split
    named "valid" where there is one, else the second split when a later one is left for testing
    (the last split is the test split); None for a dataset with no split to spare for validation."""
    evaluating = spec.splits[1:]
    if "valid" in evaluating:
        return "valid"
    return evaluating[0] if len(evaluating) >= 2 else None


def assign_splits(samples: Sequence[Sample], fractions: Mapping[str, float], *, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Group -> split name. Per label, groups in hash order are dealt out in `fractions` proportions.

    Each group goes to the split furthest behind its share of the label; a tie goes to the split
    furthest behind its share overall, so small classes do not all round the same way (with three
    groups per class at 70/15/15, the third group alternates between valid and test).
    """
    names = list(fractions)
    overall = dict.fromkeys(names, 0)
    dealt = 0
    split_of: dict[str, str] = {}
    for groups in _groups_by_label(samples, seed).values():
        here = dict.fromkeys(names, 0)
        for group in groups:
            dealt += 1

            def behind(name: str) -> tuple[float, float, int]:
                return (
                    round(len(groups) * fractions[name] - here[name], 9),
                    round(dealt * fractions[name] - overall[name], 9),
                    -names.index(name),
                )

            split = max(names, key=behind)
            here[split] += 1
            overall[split] += 1
            split_of[group] = split
    return split_of


def assign_folds(samples: Sequence[Sample], folds: int, *, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Group -> fold index. Per label, groups in hash order are dealt round-robin, so folds stay stratified."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    fold_of: dict[str, int] = {}
    offset = 0
    for groups in _groups_by_label(samples, seed).values():
        for index, group in enumerate(groups):
            # continuing the deal across labels keeps fold sizes within one of each other overall
            fold_of[group] = (offset + index) % folds
        offset += len(groups)
    return fold_of


def split_dataset(
    dataset: str,
    root: Path | str,
    *,
    seed: int = DEFAULT_SEED,
    fold: Optional[int] = None,
    folds: int = DEFAULT_FOLDS,
    fractions: Optional[Mapping[str, float]] = None,
) -> dict[str, list[Sample]]:
    """Load dataset `dataset` from `root` and split it: split name -> samples."""
    spec = manager.get_dataset(dataset)
    return split_samples(load_samples(dataset, root), spec, seed=seed, fold=fold, folds=folds, fractions=fractions)


def samples_for(
    dataset: str,
    root: Path | str,
    split: str,
    *,
    seed: int = DEFAULT_SEED,
    fold: Optional[int] = None,
    folds: int = DEFAULT_FOLDS,
    fractions: Optional[Mapping[str, float]] = None,
) -> list[Sample]:
    """The samples of one split (of one cross-validation fold, with `fold`) of a dataset folder."""
    spec = manager.get_dataset(dataset)
    if split not in spec.splits:
        raise ConfigError(f"{dataset} has no split {split!r}; its splits are {', '.join(spec.splits)}")
    return split_dataset(dataset, root, seed=seed, fold=fold, folds=folds, fractions=fractions)[split]


# ---- helpers -----------------------------------------------------------------------------------


def _check_official(samples: Sequence[Sample], spec: DatasetSpec) -> None:
    """A dataset with official splits puts every sample in one: the rule, with how far the loader is from it."""
    stray = [sample for sample in samples if sample.split not in spec.splits]
    if stray:
        given = "no split" if stray[0].split is None else f"the split {stray[0].split!r}"
        raise PluginError(
            f"dataset {spec.name} declares official splits, so its loader must give every sample one of "
            f"{', '.join(spec.splits)}; {count(len(stray), 'sample')} of {len(samples)} do not "
            f"(the first, {stray[0].path}, has {given}); fix the loader, or set official_splits=False to let mvit split it"
        )


def _checked_fractions(spec: DatasetSpec, fractions: Optional[Mapping[str, float]]) -> dict[str, float]:
    wanted = dict(spec.split_fractions if fractions is None else fractions)
    unknown = sorted(set(wanted) - set(spec.splits))
    if unknown:
        raise ConfigError(f"{spec.name} has no split {unknown[0]!r}; its splits are {', '.join(spec.splits)}")
    if any(value < 0 for value in wanted.values()) or abs(sum(wanted.values()) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {wanted}")
    # every split of the dataset is present, in the dataset's order, so dealing is reproducible
    return {name: wanted.get(name, 0.0) for name in spec.splits}


def _cross_validation(
    samples: Sequence[Sample], spec: DatasetSpec, fractions: dict[str, float], *, seed: int, fold: int, folds: int
) -> dict[str, str]:
    if not 0 <= fold < folds:
        raise ConfigError(f"fold must be between 0 and {folds - 1} for {folds}-fold cross-validation, got {fold}")
    fold_of = assign_folds(samples, folds, seed=seed)
    held_out, rest = spec.splits[-1], spec.splits[:-1]
    remaining = sum(fractions[name] for name in rest)
    if remaining <= 0:
        raise ConfigError(f"split fractions leave nothing to train {spec.name} on: {fractions}")
    inner = {name: fractions[name] / remaining for name in rest}
    split_of = assign_splits([s for s in samples if fold_of[s.group] != fold], inner, seed=seed)
    split_of.update({group: held_out for group, index in fold_of.items() if index == fold})
    return split_of


def _group_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def _groups_by_label(samples: Sequence[Sample], seed: int) -> dict[str, list[str]]:
    """Label -> its groups in seeded hash order. A group with mixed labels counts under its commonest."""
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        labels[sample.group][sample.label] += 1
    by_label: dict[str, list[str]] = defaultdict(list)
    for group, counter in labels.items():
        label = min(counter, key=lambda name: (-counter[name], name))
        by_label[label].append(group)
    return {label: sorted(groups, key=lambda g: _group_key(seed, g)) for label, groups in sorted(by_label.items())}

