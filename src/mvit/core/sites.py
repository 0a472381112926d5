"""Site profiles: a clinic's own version of some heads, fitted by `mvit adapt` on its labelled images.

A site changes what the heads answer, never the backbone: each of its heads has the base head's
classes with its own weights, temperature and threshold, and the profile records how many images of
each class it learned from and its cross-validated figures against the base head. Several sites
live in one model file beside the base heads, which they leave unchanged; `Model.with_site(name)`
is the model as that site sees it, and every command and the API take `site=` the way they take
`head=`. A file without sites loads and predicts exactly as before sites existed.

Stored as tensors `site.<name>.<head>.<parameter>` and, in the metadata, one `SiteInfo` per site.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from mvit.core.gate import GateInfo, OODGate
from mvit.core.heads import ClassifierHead, HeadInfo
from mvit.registry.specs import NAME_PATTERN

TENSOR_PREFIX = "site."
GATE = "_gate."  # a site's gate tensors, `site.<name>._gate.<tensor>` (no head name starts with "_")


class SiteInfo(BaseModel):
    """What a site profile is and how well it did. Stored in the model file's metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    heads: dict[str, HeadInfo]  # the site's versions of base heads, by the base head's name
    images: int  # labelled images the site's heads learned from
    # head -> cross-validated figures: images per class, base and site ROC AUC (or balanced accuracy)
    # with 95 % intervals, ...
    report: dict[str, dict[str, Any]] = Field(default_factory=dict)
    labels: str = ""  # the labels file the site was fitted from, as given
    created: str = ""
    site_weight: float = 1.0  # the site's total weight against the base head's training images
    # the site's own out-of-distribution gate on its images' features (the model's gate's feature and method)
    gate: Optional[GateInfo] = None
    # the site's colour: CIELAB L*, a*, b* of its images, each [mean, standard deviation] over the images
    colour: dict[str, list[float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "SiteInfo":
        if not self.heads:
            raise ValueError(f"site {self.name!r} has no heads")
        for key, info in self.heads.items():
            if key != info.name:
                raise ValueError(f"site {self.name!r} stores head {key!r} under the name {info.name!r}")
        return self


class Site:
    """A loaded site profile: its facts and its heads' modules."""

    def __init__(self, info: SiteInfo, classifiers: Mapping[str, ClassifierHead], gate: Optional[OODGate] = None):
        if sorted(classifiers) != sorted(info.heads):
            raise ValueError(f"site {info.name!r} describes heads {sorted(info.heads)} but holds weights for {sorted(classifiers)}")
        if (gate is None) != (info.gate is None):
            raise ValueError(f"site {info.name!r} {'describes a gate it has no tensors for' if gate is None else 'has gate tensors its metadata does not describe'}")
        self.info = info
        self.classifiers = dict(classifiers)
        self.gate = gate

    @property
    def name(self) -> str:
        return self.info.name

    def tensors_to_save(self) -> dict[str, Tensor]:
        """`site.<name>.<head>.<parameter>` for every head of the site."""
        tensors = {f"{TENSOR_PREFIX}{self.name}.{head}.{key}": value.detach().to("cpu").contiguous()
                   for head, module in self.classifiers.items() for key, value in module.state_dict().items()}
        if self.gate is not None:
            tensors.update({f"{TENSOR_PREFIX}{self.name}.{GATE}{key[len('ood.'):]}": value
                            for key, value in self.gate.tensors_to_save().items()})
        return tensors

    @classmethod
    def from_tensors(cls, info: SiteInfo, tensors: Mapping[str, Tensor], width: int) -> "Site":
        """The inverse of `tensors_to_save`, given this site's tensors (names without `site.<name>.`)."""
        classifiers = {}
        for head, head_info in info.heads.items():
            module = ClassifierHead(width, len(head_info.classes), head_info.config)
            prefix = f"{head}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            expected = module.state_dict()
            if sorted(state) != sorted(expected):
                raise ValueError(f"site {info.name!r} head {head!r} needs tensors {sorted(expected)}, got {sorted(state)}")
            for key, value in state.items():
                if value.shape != expected[key].shape:
                    raise ValueError(f"site {info.name!r} tensor {head}.{key} is {tuple(value.shape)}, "
                                     f"the head needs {tuple(expected[key].shape)}")
            module.load_state_dict({key: value.float() for key, value in state.items()})
            classifiers[head] = module.eval()
        gate_tensors = {key[len(GATE):]: value for key, value in tensors.items() if key.startswith(GATE)}
        gate = OODGate(info.gate, gate_tensors) if info.gate is not None else None
        if gate is None and gate_tensors:
            raise ValueError(f"site {info.name!r} has gate tensors its metadata does not describe")
        return cls(info, classifiers, gate)

    def __repr__(self) -> str:
        return f"Site({self.name!r}, heads {', '.join(self.info.heads)}, {self.info.images} images)"


def check_site_heads(site: SiteInfo, base: Mapping[str, HeadInfo]) -> Optional[str]:
    """What is wrong with a site's heads against the model's base heads, or None."""
    for name, info in site.heads.items():
        if name not in base:
            return f"site {site.name!r} adapts head {name!r}, which the model does not have"
        if info.classes != base[name].classes or info.positive != base[name].positive:
            return f"site {site.name!r} head {name!r} has classes {list(info.classes)}, the base head {list(base[name].classes)}"
    return None


class GateWithSites:
    """The model's gate widened by site gates, as a site's view of the model uses it: an image is in
    distribution when it is like the training images *or* like the site's images. Duck-types
    `OODGate` for prediction: `features`, `score`, `accepts`, `threshold`, `info`.

    A score is on the training gate's scale whatever gate it comes from: each gate's score over its
    own threshold, the smallest of them, times the training gate's threshold. So `ood_score` keeps
    its meaning (at most `threshold`: in distribution), and is the training gate's own score for
    an image like the training images."""

    def __init__(self, base: OODGate, sites: Mapping[str, OODGate]):
        self.base, self.sites = base, dict(sites)
        self.info, self.method, self.threshold, self.dim = base.info, base.method, base.threshold, base.dim

    def features(self, backbone, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.features(backbone, images)  # every site gate reads the training gate's feature

    def score(self, features: Tensor) -> Tensor:
        ratios = [gate.score(features) / gate.threshold for gate in (self.base, *self.sites.values())]
        return torch.stack(ratios).min(dim=0).values * self.base.threshold  # (B,)

    def accepts(self, scores: Tensor) -> Tensor:
        return self.base.accepts(scores)

    def reason(self, score: float) -> Optional[str]:
        """Why an image was flagged (None when it was not): every check it failed, and how far."""
        if score <= self.threshold:
            return None
        sites = ", ".join(self.sites)
        return (f"unlike the training images and the images of site {sites}: {score:.3g} against {self.threshold:.3g} "
                f"on the training gate's scale for the nearest of them")

    def tensors_to_save(self) -> dict[str, Tensor]:
        return self.base.tensors_to_save()  # a view saved as a file keeps the model's own gate
