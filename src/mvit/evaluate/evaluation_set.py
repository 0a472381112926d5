"""Which images a head is scored on: a split of a dataset, cut exactly as the model was trained
(the settings its model file recorded), or every image; on another dataset, its labels bridged to
the head's classes through the shared diagnosis vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mvit.errors import ConfigError


def split_settings(provenance: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The split a model was trained with, from its model file: {"seed", "fold", "folds", "fractions"}.

    Evaluating on any other split would score the model on images it trained on, so the report
    uses this one; files without the record get the defaults training uses.
    """
    from mvit.registry import manager
    from mvit.datasets.splits import DEFAULT_FOLDS, DEFAULT_SEED

    stored = (provenance.get("splits") or {}).get(dataset) or {}
    official = manager.get_dataset(dataset).official_splits  # training ignores a fold for these too
    return {
        "seed": int(stored.get("seed", DEFAULT_SEED)),
        "fold": None if official else stored.get("fold"),
        "folds": int(stored.get("folds", DEFAULT_FOLDS)),
        "fractions": stored.get("fractions"),
    }


ALL_IMAGES = "all"  # the split name meaning every image of the dataset


@dataclass(frozen=True)
class EvaluationSet:
    """The images a head is scored on, each with its class index, and what was left out on the way."""

    head: str
    dataset: str
    split: str  # a split of the dataset, or ALL_IMAGES
    settings: Optional[dict[str, Any]]  # the split settings used; None for ALL_IMAGES
    items: list[tuple[Any, int]]  # (Sample, index of its class in the head)
    label_map: dict[str, Optional[str]]  # the dataset's label -> the head's class; None: left out
    left_out: dict[str, int]  # label -> images of the split left out because the head has no class for it


def evaluation_set(
    head: str, dataset: str, root: Union[str, Path], split: str = "test", splits: Optional[dict[str, Any]] = None
) -> EvaluationSet:
    """The images of `split` (`all`: every image) of `dataset` at `root` that `head` can be scored on.

    On the head's own dataset its `label_map` gives each image's class, as in training. On any other
    dataset the diagnosis vocabulary does (`mvit.datasets.bridging.bridge_label_map`): images whose
    label matches no single class of the head are left out and counted, and a dataset none of whose
    labels match is a ConfigError. splits: {"seed", "fold", "folds", "fractions"} for a named split
    (default: the training defaults); `all` ignores them and leaves out augmented copies, which
    duplicate other images of the dataset.
    """
    from collections import Counter

    from mvit.registry import manager
    from mvit.datasets.bridging import bridge_label_map
    from mvit.datasets.records import load_samples
    from mvit.datasets.splits import samples_for

    spec, data = manager.get_head(head), manager.get_dataset(dataset)
    label_map = bridge_label_map(spec, manager.get_dataset(spec.dataset), data)
    if split == ALL_IMAGES:
        settings = None
        samples = [sample for sample in load_samples(dataset, root) if not sample.meta.get("augmented")]
    elif split in data.splits:
        settings = dict(splits or {})
        samples = samples_for(dataset, root, split, **settings)
    else:
        raise ConfigError(f"{dataset} has no split {split!r}; choose {ALL_IMAGES} or one of {', '.join(data.splits)}")
    items, left_out = [], Counter()
    for sample in samples:
        cls = label_map.get(sample.label)
        if cls is None:
            left_out[sample.label] += 1
        else:
            items.append((sample, spec.classes.index(cls)))
    if not items:
        where = f"{dataset} at {root}" if split == ALL_IMAGES else f"the {split} split of {dataset} at {root}"
        raise ConfigError(f"{where} has no images for head {head}" + (f" (left out: {count_phrase(left_out)})" if left_out else ""))
    return EvaluationSet(head, dataset, split, settings, items, label_map, dict(sorted(left_out.items())))


def count_phrase(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {label}" for label, count in sorted(counts.items()))
