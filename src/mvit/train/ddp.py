"""Several processes under torchrun, for training: the DistributedDataParallel wrapping of a training
step (one process: no wrapping). Which process this is and the process group (`Processes`) live in
`mvit.runtime.distributed`, shared with prediction and evaluation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mvit.runtime.distributed import Processes
from mvit.core.model import Model

class StepModule(nn.Module):
    """What DistributedDataParallel wraps: images or cached features -> the task's head logits."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, heads: list[str], from_features: bool) -> dict[str, Tensor]:
        features = inputs if from_features else self.model.backbone(inputs)  # (B, D)
        return self.model.head_logits(features, heads)


def step_module(model: Model, processes: Processes, device: torch.device) -> nn.Module:
    """The model's training step, wrapped in DistributedDataParallel under torchrun.

    Wrap again whenever the unfrozen groups change: DDP only synchronises the parameters that
    required grad when it wrapped them."""
    step = StepModule(model)
    if processes.world == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)
