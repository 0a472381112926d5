"""What a plugin registers: datasets, the records they load, and the heads (class sets) they offer.

Plain pydantic models with no torch in sight, so listing plugins stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mvit.registry.diagnoses import TERMS

NAME_PATTERN = r"^[a-z][a-z0-9_\-]*$"
RESERVED_CLASS = "unknown"  # what every head answers for an image the out-of-distribution gate flags


class Sample(BaseModel):
    """One image of a dataset, as its loader found it on disk."""

    model_config = ConfigDict(frozen=True)

    path: Path
    label: str  # the dataset's own label, e.g. "mel" in HAM10000, "Melanoma" in DermMel
    group: str  # what must not be split across train and test: the lesion id where there is one
    split: Optional[str] = None  # the official split, where the dataset has one
    # free-form facts from the dataset; meta["augmented"] = True marks an augmented copy, which mvit
    # keeps out of every evaluation split
    meta: dict[str, Any] = Field(default_factory=dict)


class HeadConfig(BaseModel):
    """The shape of a classifier head: an MLP on the pooled backbone feature."""

    model_config = ConfigDict(extra="forbid")

    hidden: list[int] = Field(default_factory=list)  # hidden layer sizes; empty means one linear layer
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("hidden")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if any(size <= 0 for size in sizes):
            raise ValueError(f"hidden layer sizes must be positive, got {sizes}")
        return sizes


def check_class_set(head: str, classes: tuple[str, ...], positive: Optional[str]) -> None:
    """The rules every head's classes follow, as a plugin declares them (`HeadSpec`) and as a model
    file stores them (`HeadInfo`): two classes or more, none twice, and a positive class only on a
    two-class head, as one of its classes (the decision rule thresholds one of exactly two).
    ValueError with the sentence, for pydantic to report."""
    if len(classes) < 2:
        raise ValueError(f"head {head!r} needs at least two classes, got {list(classes)}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ValueError(f"head {head!r} lists class {', '.join(map(repr, twice))} twice: {list(classes)}")
    if positive is not None and positive not in classes:
        raise ValueError(f"head {head!r}: positive class {positive!r} is not one of its classes {list(classes)}")
    if positive is not None and len(classes) != 2:
        raise ValueError(f"head {head!r} has {len(classes)} classes, but a positive class ({positive!r}) is for a two-class head only")


class HeadSpec(BaseModel):
    """A class set a model can be trained to predict, with the dataset whose labels feed it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    dataset: str = Field(pattern=NAME_PATTERN)
    classes: tuple[str, ...]  # in the order of the head's outputs
    # dataset label -> class; labels not listed map to themselves, labels mapped to None are left out
    label_map: dict[str, Optional[str]] = Field(default_factory=dict)
    positive: Optional[str] = None  # the class a binary head screens for (sensitivity is measured on it)
    config: HeadConfig = Field(default_factory=HeadConfig)
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "HeadSpec":
        check_class_set(self.name, self.classes, self.positive)
        unknown = {c for c in self.label_map.values() if c is not None} - set(self.classes)
        if unknown:
            raise ValueError(f"head {self.name!r} maps labels to unknown classes {sorted(unknown)}")
        if RESERVED_CLASS in self.classes:
            raise ValueError(f"head {self.name!r}: {RESERVED_CLASS!r} is the label of an abstained prediction; rename that class")
        return self

    def class_of(self, label: str) -> Optional[str]:
        """The head's class for a dataset label; None when the head leaves that label out."""
        cls = self.label_map.get(label, label)
        if cls is not None and cls not in self.classes:
            return None
        return cls


class DatasetSpec(BaseModel):
    """A dataset: where its images are, what its labels mean and how it splits."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=NAME_PATTERN)
    title: str
    citation: str = ""
    license: str = ""
    homepage: str = ""
    labels: tuple[str, ...]  # every label the loader can produce
    # label -> what it means in mvit's diagnosis vocabulary (`registry.diagnoses`), e.g.
    # {"mel": "melanoma", "nv": "nevus"}; lets other datasets' heads be evaluated on this dataset and
    # this dataset's heads on others. Optional: undeclared labels have no counterpart elsewhere.
    diagnoses: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    layout: str = ""  # one line telling a user what the root folder must look like
    splits: tuple[str, ...] = ("train", "valid", "test")  # the first is the training split, the rest evaluate
    # True when the loader fills Sample.split from the dataset's own folders; otherwise mvit splits
    # deterministically by Sample.group, stratified by label, with these fractions
    official_splits: bool = False
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "valid": 0.15, "test": 0.15})
    # root folder -> one record per label row (or labelled file), whether or not its image exists, so
    # `mvit data check` can report missing images; raises DatasetError on a wrong layout
    load: Callable[[Path], list[Sample]]
    check_layout: Optional[Callable[[Path], None]] = None  # fast check; raises DatasetError naming the problem
    # root folder -> every image file the layout holds, labelled or not (to find images without labels);
    # None means every image file under the root
    find_images: Optional[Callable[[Path], list[Path]]] = None
    # True when the root may be a file as well as a folder: a CSV labels file (`read_labels_file`), say
    root_may_be_file: bool = False

    @field_validator("diagnoses", mode="before")
    @classmethod
    def _one_term_or_several(cls, diagnoses: Any) -> Any:
        if isinstance(diagnoses, dict):
            return {label: (terms,) if isinstance(terms, str) else terms for label, terms in diagnoses.items()}
        return diagnoses

    @model_validator(mode="after")
    def _diagnoses_of_known_labels(self) -> "DatasetSpec":
        unknown_labels = sorted(set(self.diagnoses) - set(self.labels))
        if unknown_labels:
            raise ValueError(f"dataset {self.name!r} declares diagnoses for labels it does not have: {unknown_labels}")
        unknown_terms = sorted({t for terms in self.diagnoses.values() for t in terms} - TERMS)
        if unknown_terms:
            raise ValueError(
                f"dataset {self.name!r}: {unknown_terms} not in mvit's diagnosis vocabulary ({', '.join(sorted(TERMS))})"
            )
        return self

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: dict[str, float]) -> dict[str, float]:
        if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
        return fractions


def is_valid_name(name: str) -> bool:
    return re.match(NAME_PATTERN, name) is not None
