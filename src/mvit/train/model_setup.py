"""The model a run starts from: a backbone (random, timm's DeiT, a DeiT checkpoint, the bundled
model or an earlier mvit model) and one head per trained head name, keeping an earlier model's
heads where still valid."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Optional

import torch

from mvit.errors import ConfigError
from mvit.core import model_file
from mvit.core.model import Model
from mvit.core.heads import HeadInfo
from mvit.core.vit import VisionTransformer, named_config, resample_position_embedding
from mvit.core.weights import create_backbone
from mvit.registry import manager
from mvit.train.config import BUNDLED, BackboneConfig, TrainConfig, init_model_file
from mvit.train.run_folder import UNCALIBRATED
from mvit.train.tasks import Task


def build_model(config: TrainConfig, tasks: list[Task], warn: Callable[[str], None]) -> Model:
    """Backbone from random, timm's DeiT, a DeiT checkpoint or an earlier mvit model; one head per name."""
    torch.manual_seed(config.training.seed)  # the same initial heads (and random backbone) on every rank and run
    init, b = config.backbone.init, config.backbone
    overrides = {**b.overrides(), "image_size": config.preprocessing.image_size}
    previous: Optional[Model] = None
    init_file = init_model_file(init)
    if init == "random":
        warn("the backbone starts from RANDOM weights: expect far lower accuracy than from pretrained DeiT weights")
        backbone = create_backbone(b.name, None, **overrides)
    elif init_file is not None:
        previous = model_file.load(init_file)
        init = "the bundled model" if init == BUNDLED else init  # as the messages below name it
        backbone = _continued_backbone(previous.backbone, b, init, warn)
        trained_at, size = backbone.config.image_size, config.preprocessing.image_size
        if size != trained_at:  # set explicitly: an unset image_size is the init model's (config.py)
            backbone = _resized_backbone(backbone, size, init)
            warn(f"the backbone of {init} was trained at {trained_at} px and this run feeds it {size} px images "
                 f"(preprocessing.image_size; its position embedding is resampled); remove preprocessing.image_size "
                 f"to train at {trained_at} px")
        changed = {k: v for k, v in config.preprocessing.model_dump().items()
                   if k != "image_size" and v != previous.preprocessing.model_dump()[k]}
        if changed:
            warn(f"the preprocessing differs from that of {init} ({', '.join(f'{k} = {v}' for k, v in changed.items())}); "
                 f"its backbone{' (frozen here)' if config.unfreeze.mode == 'none' else ''} learned from differently prepared images")
    else:
        if init != "timm" and not Path(init).exists():
            raise ConfigError(f"backbone.init {init}: no such file{_did_you_mean_bundled(init)}")
        backbone = create_backbone(b.name, init, **overrides)
    model = Model(backbone, config.preprocessing)
    if previous is not None:
        model.provenance = dict(previous.provenance)
        if config.unfreeze.mode == "none" and backbone.config.image_size == previous.backbone.config.image_size:
            # a frozen backbone, fed images of its own size, leaves the gate's features unchanged
            model.ood_gate = previous.ood_gate
    trained_here = {name for task in tasks for name in task.heads}
    if previous is not None:
        _keep_features_records(model, previous, config, trained_here, init, warn)
    for name, info in (previous.heads.items() if previous else []):
        # A frozen backbone leaves the earlier heads valid: keep them, so a model gains heads one
        # dataset at a time. A backbone that will change would leave them stale: drop them.
        if name in trained_here or config.unfreeze.mode == "none":
            if name not in trained_here or info.classes == manager.get_head(name).classes:
                # a head trained further here loses the init model's operating point: it was fitted
                # for other weights, and the end of this run fits one for these (a kept head keeps its)
                model.add_head(info.model_copy(update=UNCALIBRATED) if name in trained_here else info)
                model.classifiers[name].load_state_dict(previous.classifiers[name].state_dict())
        else:
            warn(f"head {name!r} of {init} is dropped: the backbone is fine-tuned, which would leave it stale")
    for name in sorted(trained_here - set(model.heads)):
        model.add_head(HeadInfo.from_spec(manager.get_head(name)))
    return model


def _keep_features_records(model: Model, previous: Model, config: TrainConfig, trained_here: set[str], init: str,
                           warn: Callable[[str], None]) -> None:
    """What the init model learned on its backbone's features stays valid while that backbone stays
    frozen at its own image size: the features its kept heads were fitted on, and its site profiles.
    A backbone that will change would leave both stale."""
    frozen = config.unfreeze.mode == "none" and model.backbone.config.image_size == previous.backbone.config.image_size
    if frozen:
        model.reference = previous.reference.without(trained_here) if previous.reference is not None else None
        model.sites = dict(previous.sites)
    elif previous.sites:
        warn(f"the site profiles of {init} ({', '.join(previous.sites)}) are dropped: the backbone is fine-tuned, "
             f"which would leave them stale; fit them again with `mvit adapt`")


def _continued_backbone(backbone: VisionTransformer, b: BackboneConfig, init: str, warn: Callable[[str], None]) -> VisionTransformer:
    """An mvit model's backbone, with the regularisation the config sets explicitly (dropout,
    attention_dropout, drop_path); the architecture is the model's, and a config that sets another
    one is refused rather than silently ignored."""
    explicit = b.model_fields_set
    # (an image size is preprocessing.image_size, which backbone.image_size must equal: build_model)
    shape = {k: getattr(b, k) for k in ("patch_size", "width", "depth", "num_heads") if k in explicit}
    differing = {k: v for k, v in shape.items() if v is not None and v != getattr(backbone.config, k)}
    if differing:
        have = ", ".join(f"{k} = {getattr(backbone.config, k)}" for k in differing)
        raise ConfigError(f"backbone.init {init} has {have}; a config cannot change its architecture, so remove "
                          f"backbone.{', backbone.'.join(differing)} (or start from another init)")
    if "name" in explicit:
        warn(f"backbone.name {b.name!r} is not used: the architecture is that of {init} (recorded in the model file)")
    regularisation = {k: getattr(b, k) for k in ("dropout", "attention_dropout", "drop_path") if k in explicit}
    if not regularisation or all(getattr(backbone.config, k) == v for k, v in regularisation.items()):
        return backbone
    continued = VisionTransformer(named_config(backbone.config, **regularisation))
    continued.load_state_dict(backbone.state_dict())  # same shapes: regularisation has no weights
    return continued


def _resized_backbone(backbone: VisionTransformer, size: int, init: str) -> VisionTransformer:
    """The backbone for `size` px images: its weights, the position embedding resampled to the new
    patch grid (as DeiT does when fine-tuning at 384 px). A size that is no multiple of the patch is refused."""
    patch = backbone.config.patch_size
    if size % patch:
        raise ConfigError(f"preprocessing.image_size {size} does not fit the backbone of {init}, whose {patch} px "
                          f"patches need a multiple of {patch}; remove preprocessing.image_size to use its "
                          f"{backbone.config.image_size} px")
    resized = VisionTransformer(named_config(backbone.config, image_size=size))
    state = dict(backbone.state_dict())
    grid = resized.config.grid_size
    state["position_embedding"] = resample_position_embedding(state["position_embedding"], (grid, grid))
    resized.load_state_dict(state)
    return resized


def _did_you_mean_bundled(init: str) -> str:
    """A hint for an init that reads like a name for the model that comes with mvit."""
    stem = Path(init).stem.lower()
    if difflib.get_close_matches(stem, ("bundled", "default", "builtin", "bundle"), n=1, cutoff=0.75):
        return f'; did you mean init = "{BUNDLED}"? (the model that comes with mvit)'
    return ""
