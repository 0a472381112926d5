"""Dynamic batching: the images of concurrent requests go through the model together.

Requests hand in their decoded images, n x (3, S, S), and get a future back. A model thread takes the
oldest waiting request and, with it, whatever else is already waiting, then waits for more until the
batch holds `max_batch` images or the oldest has waited `max_wait` seconds, and runs them as one
backbone pass. Under load the batches fill without waiting; alone, a request waits `max_wait` at most.

There may be several model threads, each running its own batches on a share of the cores: on a CPU,
two threads with one core each answer more images per second than one with two. Small batches
use two cores poorly, and one thread's batch runs while the other's requests are still decoding
(measured in docs/serving.md). The model's forward keeps no state, so the threads can share it.

Admission is bounded: `admit(n)` counts images from the moment a request is read until it is
answered, and refuses (`Overloaded`, with a Retry-After estimate) beyond `max_queue`, so an overload
becomes fast 503s instead of a queue, and memory, that grow without limit.

Other work on the model (attention maps) runs on a model thread too, between its batches, through
`call`, so it shares the model threads' cores instead of taking more.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("mvit.serve")

# images (B, 3, S, S) -> ({head: logits (B, K)}, out-of-distribution scores (B,) or None), on the CPU
RunBatch = Callable[[Tensor], tuple[dict[str, Tensor], Optional[Tensor]]]


@dataclass(frozen=True)
class BatchAnswer:
    """What the model said for one request's images, rows in the order they were handed in."""

    logits: dict[str, Tensor]  # head -> (n, K) float32
    ood_scores: Optional[Tensor]  # (n,) float32, when the model has a gate


class Overloaded(Exception):
    """More images are waiting than the server accepts; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Job:
    images: Optional[Sequence[Tensor]]  # n x (3, S, S); None for a `call`
    future: Future = field(default_factory=Future)
    call: Optional[Callable[[], object]] = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return 0 if self.images is None else len(self.images)


_STOP = _Job(images=None)


class Batcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int, max_wait: float, max_queue: int, threads: int = 1,
                 on_start: Optional[Callable[[], None]] = None):
        """threads: model threads; on_start: run first on each (e.g. to give it its share of the cores)."""
        self.run_batch, self.max_batch, self.max_wait, self.max_queue = run_batch, max_batch, max_wait, max_queue
        self._jobs: "queue.Queue[_Job]" = queue.Queue()  # bounded by admission, not by the queue itself
        self._admitted = 0
        self._lock = threading.Lock()
        self._seconds_per_image = 0.05  # a running estimate, for Retry-After
        self._on_start = on_start
        self._threads = [threading.Thread(target=self._serve, name=f"mvit-model-{k}", daemon=True) for k in range(threads)]
        self._closed = False
        self.batches_run = 0  # backbone passes so far (a request of more than max_batch images takes several)
        self.images_run = 0

    # ---- the requests' side -----------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Images admitted and not yet answered."""
        return self._admitted

    def admit(self, count: int) -> "_Admission":
        """Reserve room for `count` images until the returned admission is closed (a `with` block),
        or raise `Overloaded`; `grow` the admission when a request turns out to hold more."""
        admission = _Admission(self, 0)
        admission.grow(count)
        return admission

    def submit(self, images: Sequence[Tensor]) -> Future:
        """Images n x (3, S, S) -> a future of their `BatchAnswer`."""
        return self._put(_Job(images=images))

    def call(self, work: Callable[[], object]) -> Future:
        """Run `work()` on a model thread, between its batches; a future of what it returns."""
        return self._put(_Job(images=None, call=work))

    def close(self) -> None:
        """Answer everything handed in so far, then stop the model threads."""
        if not self._closed:
            self._closed = True
            for thread in self._threads:  # a stop for each, after the jobs already queued
                self._jobs.put(_STOP)
            for thread in self._threads:
                if thread.is_alive():
                    thread.join()

    def _put(self, job: _Job) -> Future:
        if self._closed:
            raise RuntimeError("the server is shutting down")
        self._jobs.put(job)
        return job.future

    def _reserve(self, count: int, held: int) -> None:
        """Room for `count` more images for an admission that holds `held`. A request larger than the
        whole queue is admitted when nothing else waits, so that no valid request is refused forever."""
        with self._lock:
            if self._admitted > held and self._admitted + count > self.max_queue:
                wait = self._admitted * self._seconds_per_image / len(self._threads)
                raise Overloaded(max(1, min(60, math.ceil(wait))))
            self._admitted += count

    def _release(self, count: int) -> None:
        with self._lock:
            self._admitted -= count

    # ---- the model thread ---------------------------------------------------------------------------

    def _serve(self) -> None:
        if self._on_start is not None:
            self._on_start()
        held: Optional[_Job] = None  # taken from the queue by this thread but left for its next batch
        while True:
            first, held = held or self._jobs.get(), None
            if first is _STOP:
                return
            if first.call is not None:
                _settle(first.future, first.call)
                continue
            jobs, held = self._gather(first)
            self._run(jobs)

    def _gather(self, first: _Job) -> tuple[list[_Job], Optional[_Job]]:
        """`first` and the jobs that join it: all those already waiting, then those arriving until
        `first` has waited max_wait, up to max_batch images; and the job taken that did not fit."""
        jobs, count = [first], first.size
        deadline = first.arrived + self.max_wait
        while count < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP or job.call is not None or count + job.size > self.max_batch:
                return jobs, job
            jobs.append(job)
            count += job.size
        return jobs, None

    def _run(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        try:
            images = torch.stack([image for job in jobs for image in job.images])  # (B, 3, S, S)
            # one request of more than max_batch images runs alone, in max_batch slices
            parts = [self.run_batch(images[start : start + self.max_batch]) for start in range(0, len(images), self.max_batch)]
            logits = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
            scores = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
        except BaseException as error:  # a bug: every request of the batch learns of it, the thread goes on
            log.exception("the model failed on a batch of %d images", sum(job.size for job in jobs))
            for job in jobs:
                job.future.set_exception(error)
            return
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (time.monotonic() - started) / len(images)
        with self._lock:
            self.batches_run += len(parts)
            self.images_run += len(images)
        start = 0
        for job in jobs:
            rows = slice(start, start + job.size)
            job.future.set_result(BatchAnswer({name: value[rows] for name, value in logits.items()},
                                              None if scores is None else scores[rows]))
            start += job.size


class _Admission:
    """Room held in the queue for one request's images."""

    def __init__(self, batcher: Batcher, count: int):
        self.batcher, self.count = batcher, count

    def grow(self, count: int) -> None:
        """Hold room for `count` more images, or raise `Overloaded` (holding what it held)."""
        if count > 0:
            self.batcher._reserve(count, self.count)
            self.count += count

    def __enter__(self) -> "_Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.batcher._release(self.count)


def _settle(future: Future, work: Callable[[], object]) -> None:
    try:
        future.set_result(work())
    except BaseException as error:  # handed to the request, which words it (or logs a bug)
        future.set_exception(error)
