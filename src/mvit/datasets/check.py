"""What `mvit data check` finds in a dataset folder, and whether mvit can train and test on it.

Errors make a dataset unusable: label rows whose image is missing, images that do not decode, a
split left empty. Warnings do not: images no label row names (ignored), augmented copies in an
evaluation split (left out), identical images in two splits (taken out of training by
`leakage.exclude_shared`).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from mvit.core.training_images import isic_id
from mvit.data.images import EncodedImage, decode_problem
from mvit.datasets import records, splits
from mvit.registry import manager
from mvit.registry.words import count
from mvit.registry.specs import Sample

EXAMPLES = 10  # problem paths shown per kind in sentences; the JSON report has them all


class BadImage(BaseModel):
    path: str
    error: str


class CheckReport(BaseModel):
    dataset: str
    root: str
    usable: bool
    images: int  # labelled images found
    counts: dict[str, dict[str, int]]  # split -> label -> images
    augmented: dict[str, int]  # split -> augmented copies among its images
    missing_images: list[str]  # label rows without their image
    unreadable_images: list[BadImage]
    unlabelled_images: list[str]  # images no label row names
    augmented_in_evaluation: list[str]  # left out of the evaluation splits
    duplicates_across_splits: list[list[str]]  # "split: path" of identical files in different splits
    groups_across_splits: list[str]  # groups (lesions) with images in more than one official split
    isic_ids_across_splits: list[str] = []  # one ISIC image (resized or re-encoded copies) in several splits
    empty_splits: list[str]
    errors: list[str]  # one sentence each; any makes the dataset unusable
    warnings: list[str]


def check_dataset(name: str, root: Path | str, *, seed: int = splits.DEFAULT_SEED) -> CheckReport:
    """Check dataset `name` under `root`. A wrong layout raises DatasetError; the rest is reported."""
    spec = manager.get_dataset(name)
    root = Path(root).expanduser()
    samples = records.read_dataset(spec, root)
    present = [s for s in samples if s.path.is_file()]
    missing = [str(s.path) for s in samples if not s.path.is_file()]
    labelled = {s.path.resolve() for s in samples}
    unlabelled = [str(p) for p in records.find_images(spec, root) if p.resolve() not in labelled]

    by_split = splits.split_samples(present, spec, seed=seed)
    kept = {s.path for split in by_split.values() for s in split}
    dropped_augmented = [str(s.path) for s in present if s.meta.get("augmented") and s.path not in kept]
    hashes, unreadable = _inspect([s.path for s in present])

    counts = {split: _count(items) for split, items in by_split.items()}
    augmented = {split: sum(1 for s in items if s.meta.get("augmented")) for split, items in by_split.items()}
    empty = [split for split, items in by_split.items() if not items]
    duplicates = _duplicates(by_split, hashes)
    groups = _groups_across(by_split) if spec.official_splits else []
    isic_ids = _isic_ids_across(by_split, duplicates)

    report = CheckReport(
        dataset=name,
        root=str(root),
        usable=True,
        images=len(present),
        counts=counts,
        augmented=augmented,
        missing_images=missing,
        unreadable_images=unreadable,
        unlabelled_images=unlabelled,
        augmented_in_evaluation=dropped_augmented,
        duplicates_across_splits=duplicates,
        groups_across_splits=groups,
        isic_ids_across_splits=isic_ids,
        empty_splits=empty,
        errors=[],
        warnings=[],
    )
    errors, warnings = _sentences(report)
    return report.model_copy(update={"usable": not errors, "errors": errors, "warnings": warnings})


def _sentences(report: CheckReport) -> tuple[list[str], list[str]]:
    """What the report's findings say: (errors, which make the dataset unusable; warnings)."""
    errors, warnings = [], []
    missing, unreadable = report.missing_images, report.unreadable_images
    if missing:
        errors.append(_sentence(f"{count(len(missing), 'label row')} without {'its image' if len(missing) == 1 else 'their image'}", missing))
    if unreadable:
        errors.append(_sentence(f"{count(len(unreadable), 'image')} that {'does' if len(unreadable) == 1 else 'do'} not decode", [f"{b.path} ({b.error})" for b in unreadable]))
    if report.empty_splits:
        errors.append(f"the split(s) {', '.join(report.empty_splits)} have no images")
    unlabelled, dropped_augmented = report.unlabelled_images, report.augmented_in_evaluation
    if unlabelled:
        warnings.append(_sentence(f"{count(len(unlabelled), 'image')} without a label, ignored", unlabelled))
    if dropped_augmented:
        warnings.append(_sentence(f"{count(len(dropped_augmented), 'augmented copy', 'augmented copies')} in evaluation splits, left out", dropped_augmented))
    duplicates, groups, isic_ids = report.duplicates_across_splits, report.groups_across_splits, report.isic_ids_across_splits
    if duplicates:
        warnings.append(
            _sentence(f"{count(len(duplicates), 'image')} identical across splits; training leaves out its copies",
                      [" = ".join(d) for d in duplicates])
        )
    if groups:
        warnings.append(_sentence(f"{count(len(groups), 'group')} with images in more than one split", groups))
    if isic_ids:
        warnings.append(_sentence(
            f"{count(len(isic_ids), 'ISIC id')} in more than one split (copies of one image, resized or re-encoded); "
            "training leaves out its copies", isic_ids))
    return errors, warnings


def _inspect(paths: list[Path]) -> tuple[dict[Path, str], list[BadImage]]:
    """Hash and decode every file (threads: I/O, hashing and decoding release the GIL)."""

    def one(path: Path) -> tuple[Path, str, Optional[str]]:
        try:
            data = path.read_bytes()
        except OSError as error:
            return path, "", f"cannot read: {error.strerror or error}"
        return path, hashlib.sha256(data).hexdigest(), decode_problem(EncodedImage(data, path.name))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, paths))
    hashes = {path: digest for path, digest, _ in results if digest}
    bad = [BadImage(path=str(path), error=error) for path, _, error in results if error]
    return hashes, bad


def _count(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for sample in samples:
        counts[sample.label] += 1
    return dict(sorted(counts.items()))


def _duplicates(by_split: dict[str, list[Sample]], hashes: dict[Path, str]) -> list[list[str]]:
    files: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for split, samples in by_split.items():
        for sample in samples:
            if sample.path in hashes:
                files[hashes[sample.path]].append((split, sample.path))
    return [
        [f"{split}: {path}" for split, path in entries]
        for entries in files.values()
        if len({split for split, _ in entries}) > 1
    ]


def _groups_across(by_split: dict[str, list[Sample]]) -> list[str]:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for split, samples in by_split.items():
        for sample in samples:
            splits_of[sample.group].add(split)
    return sorted(f"{group} ({', '.join(sorted(names))})" for group, names in splits_of.items() if len(names) > 1)


def _isic_ids_across(by_split: dict[str, list[Sample]], identical: list[list[str]]) -> list[str]:
    """ISIC ids whose images sit in more than one split, beyond the byte-identical copies already listed."""
    reported = {path for entries in identical for path in entries}
    splits_of: dict[str, set[str]] = defaultdict(set)
    paths_of: dict[str, set[str]] = defaultdict(set)
    for split, samples in by_split.items():
        for sample in samples:
            found = isic_id(sample.path)
            if found:
                splits_of[found].add(split)
                paths_of[found].add(f"{split}: {sample.path}")
    return sorted(
        f"{found} ({', '.join(sorted(names))})" for found, names in splits_of.items()
        if len(names) > 1 and not paths_of[found] <= reported
    )


def _sentence(summary: str, items: list[str]) -> str:
    more = f" and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
    return f"{summary}: {', '.join(items[:EXAMPLES])}{more}"
