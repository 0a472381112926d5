"""How a pass over images runs on this machine, never what it computes: one frozen value the command
line or the trainer builds once and hands down whole, instead of each setting threaded by hand
through every signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from mvit.runtime.precision import Precision

if TYPE_CHECKING:  # pragma: no cover - a runtime module, imported only to name the type
    from mvit.runtime.distributed import Processes


def quiet(message: str) -> None:
    """The `say` of a run nobody watches."""


@dataclass(frozen=True)
class RunOptions:
    precision: Precision = "auto"
    batch_size: int = 32  # images per backbone pass
    workers: Optional[int] = None  # decoding processes; None: by image count and CPUs (`data.dataset.loader_workers`)
    say: Callable[[str], None] = quiet  # progress notes and warnings, a line each
    processes: Optional["Processes"] = None  # torchrun's ranks sharing the work; None: this process alone
