"""How a pass over images runs on this machine, never what it computes: one frozen value the command
line or the trainer builds once and hands down whole, instead of each setting threaded by hand
through every signature."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

from mvit.runtime.distributed import Processes
from mvit.runtime.precision import Precision


def quiet(message: str) -> None:
    """The `say` of a run nobody watches."""


@dataclass(frozen=True)
class RunOptions:
    precision: Precision = "auto"
    batch_size: int = 32  # images per backbone pass
    workers: Optional[int] = None  # decoding processes; None: by image count and CPUs (`loader_workers`)
    say: Callable[[str], None] = quiet  # progress notes and warnings, a line each
    processes: Optional[Processes] = None  # torchrun's ranks sharing the work; None: this process alone

    def workers_for(self, count: int, device) -> int:
        """Decoding processes for `count` images on `device`: `workers` as set, else by
        `loader_workers` for the processes sharing this machine."""
        if self.workers is not None:
            return self.workers
        local = self.processes.local_world if self.processes is not None else 1
        return loader_workers(count, self.batch_size, device, local)


def loader_workers(count: int, batch_size: int, device="cpu", processes: int = 1) -> int:
    """Decoding processes for `count` images, for each of `processes` processes on this machine.

    0 (decode in this process) for a single batch: starting them costs more than it saves. On a GPU up to 8, since
    decoding is then the bottleneck. On a CPU one per 8 cores (at least one): the model's threads
    use every core, each decoding process takes one from them, and one process decodes about 230
    lesion JPEGs/s, more than a CPU forward of a DeiT model needs.
    """
    if count <= batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = max(1, cpus // processes)
    most = min(8, cpus) if str(device).split(":")[0] == "cuda" else max(1, cpus // 8)  # a torch.device or its name
    return max(1, min(most, math.ceil(count / batch_size)))
