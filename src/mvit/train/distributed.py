"""Several processes under torchrun: this process's rank, the process group, and the
DistributedDataParallel wrapping of a training step (one process: no wrapping, no group)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mvit.infer.model import Model


@dataclass
class Processes:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls, device_type: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


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
