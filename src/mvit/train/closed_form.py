"""Heads on a frozen backbone, fitted in closed form (`linear_heads`) instead of by epochs.

The run's training images become one bank of backbone features, each image once however many of
the run's datasets hold it (DermMel's images are HAM10000 images), with a class index per head. A
head trains on its own dataset's images and on those of the datasets its dataset `borrow_from`s,
wherever their labels fall into one of its classes in the diagnosis vocabulary (HAM10000's 4,000
images for the DermMel head: more melanomas from more clinics than DermMel's 500). Its penalty
strength is chosen on its own dataset's validation split. The bank is kept in the model file
(`infer.reference`), so `mvit adapt` can later refit any head with a clinic's images mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mvit.data.mixing import IGNORE
from mvit.errors import ConfigError
from mvit.core.model import Model
from mvit.core.reference import UNUSED, ReferenceFeatures, ReferenceInfo
from mvit.registry import manager
from mvit.datasets.bridging import bridge_label_map
from mvit.core.training_images import content_hash
from mvit.train import linear_heads
from mvit.train.tasks import TRAIN, VALID, Task


@dataclass(frozen=True)
class FittedHeads:
    heads: dict[str, linear_heads.LinearHead]
    reference: ReferenceFeatures


def applies(model: Model, config) -> bool:
    """Whether this run's heads are fitted in closed form: a frozen backbone on unaugmented images
    (so features come from the cache) and linear heads, unless `training.head_fit` asks for epochs."""
    t = config.training
    possible = config.unfreeze.mode == "none" and not config.augmentation.enabled
    linear = all(not model.heads[name].config.hidden for name in model.heads)
    if t.head_fit == "closed_form" and not (possible and linear):
        raise ConfigError('training.head_fit = "closed_form" needs a frozen backbone (unfreeze.mode = "none"), '
                          'augmentation.enabled = false and heads without hidden layers; set head_fit = "auto" or "epochs"')
    borrowing = [d.name for d in config.datasets if d.borrow_from]
    if borrowing and not (possible and linear and t.head_fit != "epochs"):
        raise ConfigError(f"borrow_from (dataset {borrowing[0]}) works with heads fitted in closed form (a frozen backbone, "
                          f"no augmentation, linear heads, head_fit \"auto\"); remove it")
    return t.head_fit != "epochs" and possible and linear


def fit_heads(tasks: list[Task], features: Callable[[Task, str], Tensor], *, borrow_from: dict[str, list[str]],
              fingerprint: str, say: Callable[[str], None]) -> FittedHeads:
    """Fit every head of `tasks`; `features(task, role)` gives a split's features (N, D), NaN rows
    for images skipped as unreadable; `borrow_from`: dataset -> the datasets its heads also learn from."""
    bank, targets = _bank(tasks, features, borrow_from)
    fitted = {}
    for task in tasks:
        valid = features(task, VALID)
        for h, name in enumerate(task.heads):
            classes = len(manager.get_head(name).classes)
            used = targets[name] != UNUSED
            v_targets = task.labels(VALID)[:, h]
            keep = (v_targets != IGNORE) & torch.isfinite(valid).all(dim=1)
            fitted[name] = linear_heads.choose_and_fit((bank[used], targets[name][used]), (valid[keep], v_targets[keep]), classes)
            say(f"head {name}: {int(used.sum())} training images, L2 strength {fitted[name].strength:.3g} "
                f"(validation loss {fitted[name].held_out_loss:.3f} on {int(keep.sum())} images)")
    info = ReferenceInfo(images=len(bank), heads=list(targets), datasets=[task.dataset for task in tasks], fingerprint=fingerprint)
    return FittedHeads(fitted, ReferenceFeatures(info, bank, targets))


def load_into(model: Model, head: str, fitted: linear_heads.LinearHead) -> None:
    """Copy a fitted linear head into the model's module for `head` (one Linear layer)."""
    layer = model.classifiers[head].layers[-1]
    with torch.no_grad():
        layer.weight.copy_(fitted.weight.to(layer.weight))
        layer.bias.copy_(fitted.bias.to(layer.bias))


def _bank(tasks: list[Task], features: Callable[[Task, str], Tensor], borrow_from: dict[str, list[str]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every training image once (N, D), and each head's class index per row (N,), UNUSED where it
    does not train on that image."""
    rows: dict[str, int] = {}  # content hash -> row
    vectors: list[Tensor] = []
    labels: list[dict[str, int]] = []  # per row: head -> class index
    for task in tasks:
        split = features(task, TRAIN)
        borrowed = _borrowed_classes(task, [other for other in tasks if task.dataset in borrow_from.get(other.dataset, [])])
        for i, sample in enumerate(task.samples(TRAIN)):
            if not bool(torch.isfinite(split[i]).all()):  # skipped as unreadable
                continue
            key = content_hash(sample.path)
            if key not in rows:
                rows[key] = len(vectors)
                vectors.append(split[i])
                labels.append({})
            row = labels[rows[key]]
            for h, name in enumerate(task.heads):
                target = int(task.labels(TRAIN)[i, h])
                if target != IGNORE:
                    row[name] = target
            for name, target in borrowed.get(sample.label, {}).items():
                row.setdefault(name, target)  # a head's own dataset's label wins
    heads = [name for task in tasks for name in task.heads]
    targets = {name: torch.tensor([row.get(name, UNUSED) for row in labels], dtype=torch.long) for name in heads}
    return torch.stack(vectors) if vectors else torch.empty(0, 0), targets


def _borrowed_classes(task: Task, borrowers: list[Task]) -> dict[str, dict[str, int]]:
    """Label of `task`'s dataset -> {head of a borrower: class index}, for every head whose classes
    cover the label exactly once (`bridging.bridge_label_map`)."""
    found: dict[str, dict[str, int]] = {}
    for other in borrowers:
        for name in other.heads:
            head = manager.get_head(name)
            try:
                mapping = bridge_label_map(head, manager.get_dataset(head.dataset), manager.get_dataset(task.dataset))
            except ConfigError:  # no diagnoses declared, or no label matches: nothing to share
                continue
            for label, cls in mapping.items():
                if cls is not None:
                    found.setdefault(label, {})[name] = head.classes.index(cls)
    return found
