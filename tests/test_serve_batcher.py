"""The dynamic batcher of `mvit serve`: which requests share a backbone pass, the bounded queue, and
that a failure or a shutdown answers every request handed in."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="`mvit serve` needs the serve extra")

from mvit.serve.batcher import Batcher, Overloaded  # noqa: E402


class Recorder:
    """A stand-in for the model: logits that identify each image, and the batch sizes it was given."""

    def __init__(self, gate: threading.Event | None = None):
        self.sizes: list[int] = []
        self.gate = gate  # when set: each batch waits for it, to hold the model thread busy
        self.entered = threading.Event()  # a batch has reached the model

    def __call__(self, images: torch.Tensor):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.sizes.append(len(images))
        ids = images[:, 0, 0, 0]  # (B,): each test image carries its id in its first pixel
        return {"head": torch.stack([ids, -ids], dim=1)}, ids * 10


def images(*ids: float) -> torch.Tensor:
    batch = torch.zeros(len(ids), 3, 2, 2)
    batch[:, 0, 0, 0] = torch.tensor(ids)
    return batch


def started(run, **options) -> Batcher:
    settings = dict(max_batch=8, max_wait=0.0, max_queue=64) | options
    batcher = Batcher(run, **settings)
    batcher.start()
    return batcher


def test_each_request_gets_its_own_rows_back():
    batcher = started(Recorder())
    try:
        first, second = batcher.submit(images(1, 2)), batcher.submit(images(3))
        assert first.result(30).logits["head"].tolist() == [[1, -1], [2, -2]]
        assert second.result(30).logits["head"].tolist() == [[3, -3]]
        assert second.result(30).ood_scores.tolist() == [30]
    finally:
        batcher.close()


@contextlib.contextmanager
def busy_model(**options):
    """A batcher whose one model thread is busy with a first request (image 0) until `release()`,
    so that what is submitted meanwhile queues up: (batcher, recorder, the first future, release)."""
    gate = threading.Event()
    run = Recorder(gate)
    batcher = started(run, **options)
    try:
        busy = batcher.submit(images(0))
        assert run.entered.wait(30)
        yield batcher, run, busy, gate.set
    finally:
        gate.set()
        batcher.close()


def test_requests_waiting_together_share_one_backbone_pass():
    with busy_model(max_batch=8) as (batcher, run, busy, release):
        waiting = [batcher.submit(images(k)) for k in (1, 2, 3)]
        release()
        answers = [future.result(30) for future in [busy, *waiting]]
        assert run.sizes == [1, 3]  # the three queued requests went through together
        assert [answer.logits["head"][0, 0].item() for answer in answers] == [0, 1, 2, 3]


def test_a_lone_request_waits_for_company_up_to_max_wait():
    run = Recorder()
    batcher = started(run, max_batch=8, max_wait=1.0)
    try:
        first = batcher.submit(images(1))
        time.sleep(0.1)  # well within max_wait: joins the first
        second = batcher.submit(images(2))
        first.result(30), second.result(30)
        assert run.sizes == [2]
    finally:
        batcher.close()


def test_a_batch_never_exceeds_max_batch_and_a_large_request_runs_in_slices():
    with busy_model(max_batch=4) as (batcher, run, busy, release):
        small = [batcher.submit(images(k, k)) for k in (1, 2, 3)]  # 2 + 2 fit, the third waits
        large = batcher.submit(images(*range(10, 20)))  # 10 images alone, in slices of 4
        release()
        for future in [busy, *small]:
            future.result(30)
        assert large.result(30).logits["head"][:, 0].tolist() == list(range(10, 20))
        assert run.sizes == [1, 4, 2, 4, 4, 2]
        assert max(run.sizes) <= 4


def test_admission_is_bounded_and_released():
    batcher = Batcher(Recorder(), max_batch=4, max_wait=0.0, max_queue=5)
    with batcher.admit(3) as held:
        with pytest.raises(Overloaded) as busy:
            batcher.admit(3)
        assert busy.value.retry_after >= 1
        held.grow(2)  # up to the bound
        assert batcher.waiting == 5
        with pytest.raises(Overloaded):
            batcher.admit(1)
    assert batcher.waiting == 0
    with batcher.admit(50):  # larger than the whole queue, but alone: admitted
        assert batcher.waiting == 50


def test_a_failing_batch_fails_its_requests_and_the_thread_goes_on():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"head": batch[:, 0, 0, :1]}, None

    batcher = started(run)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit(images(1)).result(30)
        assert batcher.submit(images(2)).result(30).ood_scores is None
    finally:
        batcher.close()


def test_calls_run_on_the_model_thread_between_batches():
    batcher = started(Recorder())
    try:
        assert batcher.call(lambda: threading.current_thread().name).result(30).startswith("mvit-model")
        with pytest.raises(ValueError):
            batcher.call(lambda: int("x")).result(30)
    finally:
        batcher.close()


def test_close_answers_everything_handed_in_first():
    gate = threading.Event()
    batcher = started(Recorder(gate))
    pending = [batcher.submit(images(k)) for k in range(5)]
    closing = threading.Thread(target=batcher.close)
    closing.start()
    gate.set()
    closing.join(30)
    assert all(future.result(0).logits["head"].shape == (1, 2) for future in pending)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(images(9))


def test_several_model_threads_run_batches_side_by_side():
    started_on = []
    both_running = threading.Barrier(2, timeout=30)

    def run(batch):  # returns only once two batches are in the model at the same time
        both_running.wait()
        return {"head": batch[:, 0, 0, :1]}, None

    batcher = Batcher(run, max_batch=1, max_wait=0.0, max_queue=8, threads=2,
                      on_start=lambda: started_on.append(threading.current_thread().name))
    batcher.start()
    try:
        first, second = batcher.submit(images(1)), batcher.submit(images(2))
        assert first.result(30).logits["head"].item() == 1 and second.result(30).logits["head"].item() == 2
        assert sorted(started_on) == ["mvit-model-0", "mvit-model-1"]
    finally:
        batcher.close()
    assert not any(thread.is_alive() for thread in batcher._threads)


def test_the_listening_socket_is_tcp_so_answers_are_not_delayed():
    """asyncio sets TCP_NODELAY on connections of a socket made for IPPROTO_TCP only; without it a
    keep-alive client's delayed ACK held each answer about 40 ms."""
    import socket

    from mvit.cli.serve import _bind

    listening = _bind("127.0.0.1", 0)
    try:
        assert listening.proto == socket.IPPROTO_TCP
    finally:
        listening.close()
