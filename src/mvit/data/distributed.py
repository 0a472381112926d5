"""Several processes under torchrun: which one this is, its share of a list of inputs, and the
results of every share brought back to rank 0 in input order.

The helpers every stage that runs over inputs needs (`mvit predict` and `mvit evaluate` as well as
`mvit extract` and `mvit train`), so they live here, below inference; the training-only part
(DistributedDataParallel) stays in `mvit.train.distributed`. One process (no torchrun) is rank 0 of
1: no process group, no communication, the inputs all its own. torch.distributed is imported only
under torchrun.

The sharding is by position: rank r takes inputs r, r + world, r + 2 world, ... (`shard`), as the
feature cache's extraction does, so rank 0 rebuilds input order by taking one result from each rank
in turn (`merged`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from mvit.errors import MvitError

T = TypeVar("T")

EXIT_USER_ERROR = 2  # the status of the command line's error boundary for an MvitError (mvit.cli.app)
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def environment_rank() -> int:
    """This process's torchrun rank (0 without torchrun), from the environment torchrun sets."""
    world = environment_world()
    rank = _environment_number("RANK", 0 if world == 1 else None)
    if not 0 <= rank < world:
        raise MvitError(f"the environment variable RANK is {rank}, outside 0 to {world - 1} (WORLD_SIZE is {world}); "
                        f"start the processes with torchrun, which sets both, or unset them")
    return rank


def environment_world() -> int:
    """How many processes torchrun started (1 without torchrun); one sentence when the environment
    says something torchrun would not (WORLD_SIZE=abc, or WORLD_SIZE=2 without RANK)."""
    world = _environment_number("WORLD_SIZE", 1)
    if world < 1:
        raise MvitError(f"the environment variable WORLD_SIZE is {world}, and a run needs 1 process or more; "
                        f"start the processes with torchrun, which sets it, or unset it")
    if world > 1 and "RANK" not in os.environ:
        raise MvitError(f"the environment variable WORLD_SIZE is {world} but RANK is not set; start the processes "
                        f"with torchrun, which sets both, or unset WORLD_SIZE")
    return world


def environment_local_rank() -> int:
    """This process's rank on its machine (its GPU under torchrun), 0 without torchrun."""
    return _environment_number("LOCAL_RANK", 0)


def _environment_number(name: str, default: Optional[int]) -> int:
    """A whole number torchrun puts in the environment, read as the user may have set it by hand."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise MvitError(f"the environment variable {name} is {text!r}, not a whole number; it is torchrun's to set: "
                        f"start the processes with torchrun, or unset {name}") from None


def local_device(name: str) -> str:
    """The device this process runs on: under torchrun `auto` is this process's own GPU (its local
    rank), not every process's first one; otherwise `name` as given."""
    if name != "auto" or environment_world() == 1:
        return name
    from mvit.nn.precision import resolve_device

    return str(resolve_device(name, environment_local_rank()))


def quiet_unless_rank_zero() -> None:
    """For a command-line process: on every torchrun rank but 0, what mvit prints (stdout and stderr,
    its error sentences included) goes nowhere from now on, so a run speaks once, through rank 0.
    A crash's traceback (a bug) still reaches the real stderr."""
    try:
        if environment_rank() == 0:
            return
    except MvitError:  # an environment torchrun did not set: the command that reads it says so, so keep speaking
        return
    real_stderr = sys.stderr
    sink = open(os.devnull, "w")
    sys.stdout = sys.stderr = sink

    def report_crash(kind, value, trace) -> None:
        import traceback

        real_stderr.write("".join(traceback.format_exception(kind, value, trace)))
        real_stderr.flush()

    sys.excepthook = report_crash


def exit_status(error: BaseException) -> int:
    """The exit status a command ends with when `error` escapes it (as mvit.cli.app's boundary gives)."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else EXIT_FAILED)
    code = getattr(error, "exit_code", None)  # typer.Exit and click's exceptions
    if isinstance(code, int):
        return code
    if isinstance(error, MvitError):
        return EXIT_USER_ERROR
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


@dataclass
class Processes:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    _objects: Any = field(default=None, repr=False, compare=False)  # the group Python objects travel in

    @classmethod
    def from_environment(cls, device_type: str) -> "Processes":
        world = environment_world()
        if world == 1:
            return cls()
        import torch.distributed as dist

        environment_rank()  # RANK=zz: one sentence, not torch's traceback
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing and not dist.is_initialized():
            raise MvitError(f"WORLD_SIZE is {world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
                            f"start the processes with torchrun, which sets them, or unset WORLD_SIZE")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_world(self) -> int:
        """How many of the processes run on this machine (they share its CPUs)."""
        return _environment_number("LOCAL_WORLD_SIZE", self.world)

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
        dist.broadcast_object_list(box, src=0, group=self._object_group())
        return box[0]

    def gather(self, value) -> Optional[list]:
        """On rank 0: every rank's value, by rank; on the others: None."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        found = [None] * self.world if self.main else None
        dist.gather_object(value, found, dst=0, group=self._object_group())
        return found

    def shard(self, count: int) -> range:
        """The positions of this process's share of `count` inputs: every world-th, from its rank."""
        return range(self.rank, count, self.world)

    def merged(self, mine: Iterable[T], count: int, *, chunk: int = 256) -> Iterator[T]:
        """Every rank's results as one stream in input order, on rank 0; nothing on the others.

        `mine`: one result per position of `self.shard(count)`, in that order. Every rank must
        iterate this to the end: the ranks send their results in rounds of `chunk` each, so memory
        holds a round, never the whole run, and rank 0 writes while the others compute.
        """
        if self.world == 1:
            yield from mine
            return
        mine = iter(mine)
        for _ in range(math.ceil(math.ceil(count / self.world) / chunk)):  # as many rounds on every rank
            parts = self.gather(list(islice(mine, chunk)))
            if parts is None:
                continue
            for position in range(max(len(part) for part in parts)):  # rank r's k-th: input r + k * world
                for part in parts:
                    if position < len(part):
                        yield part[position]

    def on_main(self, work: Callable[[], T]) -> Optional[T]:
        """`work()` on rank 0 alone (its result there, None on the others), the others waiting for it.
        When it fails, rank 0 raises its error and the others end with the exit status that error
        gives, so no process waits for one that is gone and every process ends the same way."""
        if self.world == 1:
            return work()
        result, failure = None, None
        if self.main:
            try:
                result = work()
            except BaseException as error:  # noqa: BLE001 - re-raised below, after telling the others
                failure = error
        status = self.share(None if failure is None else exit_status(failure))
        if failure is not None:
            raise failure
        if status is not None:
            raise SystemExit(status)
        return result

    def _object_group(self):
        """Python objects travel between CPUs (gloo): the default group on the CPU, else a gloo group
        beside NCCL's, made the first time (every rank gets here at the same point)."""
        import torch.distributed as dist

        if self._objects is None:
            self._objects = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._objects
