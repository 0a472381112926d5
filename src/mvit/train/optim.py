"""How the weights are trained: AdamW with layer-wise learning rates, the warm-up and cosine
schedule, and gradual unfreezing of the backbone's parameter groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from mvit.errors import ConfigError
from mvit.core.model import Model
from mvit.train.config import TrainConfig


def make_optimizer(model: Model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with layer-wise learning rates: heads at head_lr, the last block at backbone_lr, each
    earlier block layer_decay times less. Norms, biases and tokens get no weight decay."""
    o, depth = config.optimizer, model.backbone.config.depth
    distance = {"final_norm": 0, "position": depth, "patch_embed": depth}
    distance.update({f"block.{i}": depth - 1 - i for i in range(depth)})
    param_groups = []
    for name, params in model.parameter_groups().items():
        lr = o.head_lr if name.startswith("head.") else o.backbone_lr * o.layer_decay ** distance[name]
        decay = [p for p in params if p.ndim >= 2 and not _is_token(model, p)]
        no_decay = [p for p in params if p.ndim < 2 or _is_token(model, p)]
        for subset, weight_decay in ((decay, o.weight_decay), (no_decay, 0.0)):
            if subset:
                param_groups.append({"params": subset, "lr": lr, "weight_decay": weight_decay, "group": name})
    return torch.optim.AdamW(param_groups, betas=o.betas)


def _is_token(model: Model, param: nn.Parameter) -> bool:
    return param is model.backbone.class_token or param is model.backbone.position_embedding


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per step: linear warm-up over warmup_epochs, then cosine down to min_lr_fraction (or constant)."""
    o = config.optimizer
    total = config.training.epochs * steps_per_epoch
    warmup = round(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return o.min_lr_fraction + (1 - o.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- gradual unfreezing -----------------------------------------------------------------------


def unfreeze_order(model: Model, config: TrainConfig) -> list[str]:
    """The backbone groups in the order they are unfrozen: by default from the output side back to the embeddings."""
    groups = list(model.backbone.parameter_groups())
    default = ["final_norm"] + [g for g in reversed(groups) if g.startswith("block.")] + ["position", "patch_embed"]
    order = config.unfreeze.order or default
    unknown = [g for g in order if g not in groups]
    if unknown:
        raise ConfigError(f"unfreeze.order names unknown groups {unknown}; the groups are {', '.join(groups)}")
    return order


def unfrozen_groups(epoch: int, order: list[str], config: TrainConfig) -> list[str]:
    """Backbone groups trained in `epoch` (0-based)."""
    u = config.unfreeze
    if u.mode == "all":
        return list(order)
    if u.mode == "none" or epoch < u.frozen_epochs:
        return []
    steps = 1 + (epoch - u.frozen_epochs) // u.every
    return order[: min(len(order), steps * u.groups_per_step)]


def apply_unfreezing(model: Model, unfrozen: list[str]) -> None:
    """Gradients only for unfrozen groups (frozen ones get no gradient and so no optimizer state),
    and frozen blocks in eval mode, so dropout and drop-path leave frozen features unchanged."""
    model.train()
    for name, params in model.backbone.parameter_groups().items():
        for param in params:
            param.requires_grad_(name in unfrozen)
    for index, block in enumerate(model.backbone.blocks):
        if f"block.{index}" not in unfrozen:
            block.eval()
    if "position" not in unfrozen:
        model.backbone.embedding_dropout.eval()
