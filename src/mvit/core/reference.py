"""The features a model's heads were fitted on, kept in the model file: what lets `mvit adapt` refit a
head for a clinic with the clinic's few labelled images *and* everything the head learned from,
without the training datasets (which a clinic does not have, and mvit never ships).

Measured on PH2 (docs/results.md): a head refitted on 60 of a clinic's images mixed with its
training features ranks that clinic's melanomas far better than the base head, and better than a
head fitted on the clinic's images alone and pulled towards the base head's weights.

What is stored: one bank of pooled backbone features (N, D), float16 (each training image once,
however many datasets or heads used it), and for each head a column of class indices (N,), -1
where the head did not train on that row. The bank belongs to one backbone: `fingerprint` is the
feature cache's key for it, and a bank whose backbone has since changed is never used.

Like the gate, a plain object (not an `nn.Module`): its tensors stay out of `Model.state_dict()`,
and `model_file.save` writes them under `reference.`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

TENSOR_PREFIX = "reference."
UNUSED = -1  # a head's target for a row it did not train on


class ReferenceInfo(BaseModel):
    """What the bank holds. Stored in the model file's metadata."""

    model_config = ConfigDict(extra="forbid")

    images: int
    heads: list[str]
    datasets: list[str] = []
    fingerprint: str  # the backbone and preprocessing the features came from (`data.features.fingerprint`)


class ReferenceFeatures:
    """A bank of training features (N, D) and each head's class index per row (N,)."""

    def __init__(self, info: ReferenceInfo, features: Tensor, targets: Mapping[str, Tensor]):
        if features.ndim != 2 or len(features) != info.images:
            raise ValueError(f"the bank should hold ({info.images}, D) features, got {tuple(features.shape)}")
        if sorted(targets) != sorted(info.heads):
            raise ValueError(f"the bank lists heads {info.heads} but has targets for {sorted(targets)}")
        for name, column in targets.items():
            if column.shape != (info.images,):
                raise ValueError(f"head {name}'s targets are {tuple(column.shape)}, not ({info.images},)")
        self.info = info
        self.features = features.detach().float().cpu()
        self.targets = {name: column.detach().long().cpu() for name, column in targets.items()}

    def rows(self, head: str) -> tuple[Tensor, Tensor]:
        """The features (n, D) and class indices (n,) `head` was fitted on."""
        column = self.targets[head]
        used = column != UNUSED
        return self.features[used], column[used]

    def without(self, heads: set[str]) -> "ReferenceFeatures | None":
        """The bank less some heads' columns (and the rows only they used); None when nothing is left."""
        kept = {name: column for name, column in self.targets.items() if name not in heads}
        if not kept:
            return None
        used = torch.stack([column != UNUSED for column in kept.values()]).any(0)
        info = self.info.model_copy(update={"images": int(used.sum()), "heads": list(kept)})
        return ReferenceFeatures(info, self.features[used], {name: column[used] for name, column in kept.items()})

    def merged(self, other: "ReferenceFeatures") -> "ReferenceFeatures":
        """Both banks' rows, `other`'s columns winning for a head both hold (it was fitted again)."""
        if other.info.fingerprint != self.info.fingerprint:
            raise ValueError("banks of different backbones cannot be merged")
        mine = self.without(set(other.info.heads))
        if mine is None:
            return other
        n, m = mine.info.images, other.info.images
        targets = {name: torch.cat([column, torch.full((m,), UNUSED)]) for name, column in mine.targets.items()}
        targets.update({name: torch.cat([torch.full((n,), UNUSED), column]) for name, column in other.targets.items()})
        info = ReferenceInfo(images=n + m, heads=list(targets), fingerprint=self.info.fingerprint,
                             datasets=list(dict.fromkeys([*mine.info.datasets, *other.info.datasets])))
        return ReferenceFeatures(info, torch.cat([mine.features, other.features]), targets)

    def tensors_to_save(self) -> dict[str, Tensor]:
        """`reference.features` (float16: ample for a linear head's inputs) and `reference.targets.<head>`."""
        tensors = {f"{TENSOR_PREFIX}features": self.features.half().contiguous()}
        for name, column in self.targets.items():
            tensors[f"{TENSOR_PREFIX}targets.{name}"] = column.to(torch.int16).contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, info: ReferenceInfo, tensors: Mapping[str, Tensor]) -> "ReferenceFeatures":
        """The inverse of `tensors_to_save` (names without the `reference.` prefix)."""
        targets = {name.removeprefix("targets."): t for name, t in tensors.items() if name.startswith("targets.")}
        if "features" not in tensors:
            raise ValueError("its features are missing")
        return cls(info, tensors["features"], targets)

    def __repr__(self) -> str:
        return f"ReferenceFeatures({self.info.images} images, heads {', '.join(self.info.heads)})"
