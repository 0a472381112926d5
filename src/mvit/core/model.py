"""One backbone, many named heads: any subset of heads is computed from one backbone pass.

This is the model as its file holds it: the networks, the heads' facts, the preprocessing, the gate,
the reference features and the site profiles, with head and site selection. Answering for images
(prediction, attention maps) is `mvit.infer`, whose `Model` adds those methods to this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Iterable, Optional, Union

from torch import Tensor, nn

from mvit.core.gate import OODGate
from mvit.core.heads import ClassifierHead, HeadInfo
from mvit.core.preprocessing import Preprocessing
from mvit.core.reference import ReferenceFeatures
from mvit.core.sites import GateWithSites, Site
from mvit.core.vit import VisionTransformer
from mvit.errors import MvitError, UnknownHeadError
from mvit.registry.specs import HeadSpec
from mvit.registry.words import nearest


class Model(nn.Module):
    """A backbone with named classifier heads and the preprocessing they were trained with."""

    def __init__(self, backbone: VisionTransformer, preprocessing: Optional[Preprocessing] = None):
        super().__init__()
        self.backbone = backbone
        self.preprocessing = preprocessing or Preprocessing(image_size=backbone.config.image_size)
        self.classifiers = nn.ModuleDict()
        self._head_info: dict[str, HeadInfo] = {}
        self.provenance: dict = {}  # where the model came from: training runs, data splits; kept on save
        # the out-of-distribution gate on a backbone feature (None: no gate; see ood.py). A plain
        # object, so its tensors are saved by model_file.save but are not in state_dict()
        self.ood_gate: Optional[OODGate] = None
        # the features the heads were fitted on, for `mvit adapt` (None: not recorded); a plain object too
        self.reference: Optional[ReferenceFeatures] = None
        self.sites: dict[str, Site] = {}  # site profiles by name (`sites.py`), fitted by `mvit adapt`
        self.site: Optional[str] = None  # the site this model answers as (`with_site`); None: the base heads

    @property
    def device(self):
        """The device the model's weights are on (torch.device)."""
        return next(self.backbone.parameters()).device

    # ---- heads ------------------------------------------------------------------------------

    @property
    def heads(self) -> Mapping[str, HeadInfo]:
        """Each head's description, by name: a read-only view of frozen `HeadInfo`s (change a head with
        `update_head`, `add_head` or `remove_head`, which keep the head's module and facts in step)."""
        return MappingProxyType(dict(self._head_info))

    def add_head(self, head: Union[HeadInfo, HeadSpec]) -> ClassifierHead:
        info = HeadInfo.from_spec(head) if isinstance(head, HeadSpec) else head
        if info.name in self._head_info:
            raise MvitError(f"the model already has a head named {info.name!r}")
        module = ClassifierHead(self.backbone.width, len(info.classes), info.config)
        module.to(self.device)
        self.classifiers[info.name] = module
        self._head_info[info.name] = info
        return module

    def remove_head(self, name: str) -> None:
        self.select_heads(name)
        del self.classifiers[name]
        del self._head_info[name]

    def update_head(self, name: str, **changes) -> HeadInfo:
        """Change stored facts of a head (threshold, temperature, metrics) after validating them;
        the head's shape (`classes`, `config`) is fixed by its weights."""
        self.select_heads(name)
        fixed = sorted({"classes", "config"} & set(changes))
        if fixed:
            raise MvitError(f"a head's {', '.join(fixed)} cannot change after it is built; add a new head instead")
        info = HeadInfo.model_validate({**self._head_info[name].model_dump(), **changes})
        self._head_info[name] = info
        return info

    def select_heads(self, heads: Union[None, str, Iterable[str]]) -> list[str]:
        """Validated head names: None or "all" means every head."""
        if heads is None or heads == "all":
            return list(self._head_info)
        names = [heads] if isinstance(heads, str) else list(heads)
        if "all" in names:
            return list(self._head_info)
        for name in names:
            if name not in self._head_info:
                have = ", ".join(self._head_info) or "none"
                near = nearest(name, self._head_info)  # a typo is likelier than a head to train
                what_now = f"did you mean {near!r}?" if near else f"train one with `mvit train` on a config whose dataset offers head {name!r}"
                raise UnknownHeadError(f"this model has no head {name!r} (it has: {have}); {what_now}")
        return names

    # ---- sites ------------------------------------------------------------------------------

    def with_site(self, site: Optional[str]) -> "Model":
        """The model as site `site` sees it: its heads where the site adapted them (weights,
        temperature, threshold), the base heads elsewhere, and the same backbone (shared, not copied).
        None: this model itself."""
        if site is None:
            return self
        if site not in self.sites:
            have = ", ".join(self.sites) or "none"
            raise UnknownHeadError(f"this model has no site {site!r} (it has: {have}); "
                                   f"fit one with `mvit adapt --site {site} --labels CSV`")
        profile = self.sites[site]
        view = type(self)(self.backbone, self.preprocessing)  # the same kind of model (mvit.infer's has predict)
        for name, info in self._head_info.items():
            view.classifiers[name] = profile.classifiers.get(name, self.classifiers[name])
            view._head_info[name] = profile.info.heads.get(name, info)
        view.provenance, view.ood_gate, view.reference, view.sites = self.provenance, self.ood_gate, self.reference, self.sites
        if self.ood_gate is not None and profile.gate is not None:  # judged against the training images and the site's
            view.ood_gate = GateWithSites(self.ood_gate, {site: profile.gate})
        view.site = site
        return view.train(self.training)

    # ---- computation ------------------------------------------------------------------------

    def head_logits(self, features: Tensor, heads: Union[None, str, Iterable[str]] = None) -> dict[str, Tensor]:
        """Pooled features (B, D) -> {head: logits (B, K)}."""
        return {name: self.classifiers[name](features) for name in self.select_heads(heads)}

    def forward(self, images: Tensor, heads: Union[None, str, Iterable[str]] = None) -> dict[str, Tensor]:
        """Normalised images (B, 3, S, S) -> {head: logits (B, K)}, with one backbone pass."""
        return self.head_logits(self.backbone(images), heads)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone groups (input side first), then `head.<name>` for each head."""
        groups = self.backbone.parameter_groups()
        for name, module in self.classifiers.items():
            groups[f"head.{name}"] = list(module.parameters())
        return groups
