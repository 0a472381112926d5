"""Several processes under torchrun: which one this is, its share of a list of inputs, and the
results of every share brought back to rank 0 in input order.

The helpers every stage that runs over inputs needs (`mvit predict` and `mvit evaluate` as well as
`mvit extract` and `mvit train`), so they live here, below inference; the training-only part
(DistributedDataParallel) stays in `mvit.train.ddp`. One process (no torchrun) is rank 0 of
1: no process group, no communication, the inputs all its own. torch.distributed is imported only
under torchrun.

The sharding is by whole batches: cut the inputs into the batches one process would run, rank r
takes batches r, r + world, r + 2 world, ... (`shard`), and rank 0 rebuilds input order by taking
one batch of results from each rank in turn (`merged`). Every image is then computed in the batch a
single process would have put it in, so the merged output is the single process's, byte for byte
(a batch's composition changes its numbers in the last bits).

The group's end is part of the contract (`Processes` is a context manager): after a clean run every
rank waits for the others and the group is destroyed, which joins gloo's worker threads while Python
is alive. Left to interpreter exit, a worker thread dropping the last collective's tensors needs the
GIL of an interpreter that is being torn down, and the process aborts ("terminate called without an
active exception", SIGABRT) after its work is done. After a failure the group cannot be ended
politely (a peer may be gone, or blocked waiting for this one), so the command line's boundary ends
the process without interpreter teardown (`end_process`), its files already closed.
"""

from __future__ import annotations

import contextlib
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

_speaking_stderr = None  # the real stderr of a rank > 0, kept for the sentence saying why it failed
_at_work = False  # the ranks have taken their shares (`Processes.shard`): a failure may be one rank's own


class PeerStopped(MvitError):
    """Another process of the run stopped (it failed, or was killed), so this one cannot go on. That
    process says why (or torchrun, for a signal); this one ends quietly with a non-zero status."""


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
    from mvit.runtime.precision import resolve_device

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
    global _speaking_stderr
    if _speaking_stderr is not None:  # quiet already (the command line's boundary, then the command)
        return
    real_stderr = _speaking_stderr = sys.stderr
    sink = open(os.devnull, "w")
    sys.stdout = sys.stderr = sink

    def report_crash(kind, value, trace) -> None:
        import traceback

        real_stderr.write("".join(traceback.format_exception(kind, value, trace)))
        real_stderr.flush()

    sys.excepthook = report_crash


def speaks_for_itself() -> Optional[Any]:
    """Where this process says its own failure, or None where rank 0 speaks for every process.

    Under torchrun, once the ranks have taken their shares of the work (`Processes.shard`), a
    failure may be one rank's alone: that rank says it (the real stderr, on every rank). Before,
    every process fails alike (a config, a model file, a head name) and rank 0's one sentence says
    it for all."""
    if not _at_work or environment_world() == 1:
        return None
    return _speaking_stderr or sys.stderr


def group_joined() -> bool:
    """Whether this process is in a torchrun process group it has not left (`Processes.close`)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def end_process(code: int) -> None:
    """End the process with `code`. In a process group that a failure left behind (see the module's
    docstring), without interpreter teardown: stdio flushed, then `os._exit`. Otherwise return, for
    the caller's `sys.exit`."""
    if not group_joined():
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, _speaking_stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: nothing more to say through it
            pass
    os._exit(code)


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

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()

    def close(self) -> None:
        """Leave the group after a clean run: wait for every rank (none tears down its connections
        while another still talks to it), destroy the group and let go of it, which joins gloo's
        threads now (see the module's docstring). A failed run leaves it to `end_process`."""
        if self.world == 1 or not group_joined():
            return
        import torch.distributed as dist

        self.barrier()
        self._objects = None  # the last reference to the group but torch's own: destroyed below, not at exit
        dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            with _peers_alive():
                dist.barrier()

    def share(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        with _peers_alive():
            dist.broadcast_object_list(box, src=0, group=self._object_group())
        return box[0]

    def gather(self, value) -> Optional[list]:
        """On rank 0: every rank's value, by rank; on the others: None."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        found = [None] * self.world if self.main else None
        with _peers_alive():
            dist.gather_object(value, found, dst=0, group=self._object_group())
        return found

    def shard(self, count: int, batch: int = 1) -> list[int]:
        """The positions of this process's share of `count` inputs cut into batches of `batch`:
        batches rank, rank + world, ... (with one process, every position). From now on a failure
        may be this rank's own, and it says so itself (`speaks_for_itself`)."""
        global _at_work
        _at_work = True
        return [position for start in range(self.rank * batch, count, self.world * batch)
                for position in range(start, min(start + batch, count))]

    def merged(self, mine: Iterable[T], count: int, *, batch: int = 1, chunk: int = 256) -> Iterator[T]:
        """Every rank's results as one stream in input order, on rank 0; nothing on the others.

        `mine`: one result per position of `self.shard(count, batch)`, in that order. Every rank
        must iterate this to the end: the ranks send their results in rounds of about `chunk` each
        (whole batches), so memory holds a round, never the whole run, and rank 0 writes while the
        others compute.
        """
        if self.world == 1:
            yield from mine
            return
        mine = iter(mine)
        per_round = max(1, chunk // batch)  # batches
        batches = math.ceil(count / batch)
        for _ in range(math.ceil(math.ceil(batches / self.world) / per_round)):  # as many rounds on every rank
            parts = self.gather(list(islice(mine, per_round * batch)))
            if parts is None:
                continue
            for start in range(0, len(parts[0]), batch):  # rank r's k-th batch: batch r + k * world
                for part in parts:
                    yield from part[start : start + batch]

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


@contextlib.contextmanager
def _peers_alive() -> Iterator[None]:
    """A collective that failed because another process is gone (gloo: "Connection closed by peer")
    as `PeerStopped`: that process says why it stopped."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed's DistError and gloo's plain RuntimeError
        raise PeerStopped(f"another process of this torchrun run stopped ({' '.join(str(error).split())[:200]})") from None
