"""kill -9 at seeded random points of `mvit train` and `mvit extract`, then resume or rerun.

What must hold after every kill: nothing lost (the finished epochs' records stay, every file under
its final name is whole) and nothing silently wrong (best.safetensors claims a calibrated operating
point only when the calibration finished). What must hold at the end: the same result as an
uninterrupted run, where the trainer promises it (the same models, records and calibration), and a
feature cache holding every image exactly once with the uninterrupted run's features.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mvit
from training_data import make_learnable_dermmel, merged, write_tiny_config

pytestmark = pytest.mark.slow

SETTINGS = dict(  # the tiny run that is killed and resumed
    backbone={"drop_path": 0.0}, unfreeze={"mode": "gradual", "frozen_epochs": 1}, augmentation={"enabled": False},
    optimizer={"warmup_epochs": 0}, training={"epochs": 3, "early_stopping": 100, "ema_decay": 0.9, "best_metric": "loss"},
)

SEED = 11  # the kill points are random, but the same on every run of the test


def mvit_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mvit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})


def run_to_the_end(*args: str) -> None:
    process = mvit_process(*args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def kill_when(process: subprocess.Popen, condition: Callable[[], bool], timeout: float = 120) -> bool:
    """SIGKILL `process` as soon as `condition()` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            process.communicate()
            assert process.returncode == 0, f"exited {process.returncode} before it was killed"
            return False
        if condition():
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return True
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the kill point was never reached")


def after(seconds: float) -> Callable[[], bool]:
    start = time.monotonic()
    return lambda: time.monotonic() - start >= seconds


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line whole, or this raises


def epochs_recorded(run: Path, count: int) -> Callable[[], bool]:
    return lambda: len(records(run)) >= count


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def check_nothing_silently_wrong(run: Path, epochs: int, finished_before: list[dict]) -> list[dict]:
    """The run folder after a kill: whole files under final names, the finished epochs kept, and a
    calibrated best model only once every epoch is done (calibration is the run's last step)."""
    history = records(run)
    assert without_timings(history[: len(finished_before)]) == without_timings(finished_before)  # nothing lost
    finished = 0
    if (run / "state.pt").is_file():
        finished = torch.load(run / "state.pt", weights_only=True)["epoch"] + 1  # whole: written aside and renamed
        assert finished <= len(history)
    for name in ("last.safetensors", "best.safetensors"):
        if (run / name).is_file():
            model = mvit.load(run / name)  # whole: written aside and renamed
            head = model.heads["dermmel"]
            if name == "last.safetensors" or not head.calibrated:
                assert head.calibrated is False and head.threshold is None and head.temperature == 1.0, name
            else:
                assert len(history) == epochs and head.threshold is not None, "calibrated before the last epoch"
    return history[:finished]  # the finished epochs (a later record is of an epoch a resume runs again)


def test_train_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=8, per_class_eval=4)
    config = write_tiny_config(tmp_path / "config.toml", root, **SETTINGS)
    # fine-tuning a calibrated model: its operating point must not leak into this run's files
    run_to_the_end("train", str(config), "--output", str(tmp_path / "init"), "--epochs", "1")
    assert mvit.load(tmp_path / "init" / "best.safetensors").heads["dermmel"].threshold is not None
    write_tiny_config(config, root, **merged(SETTINGS, {"backbone": {"init": str(tmp_path / "init" / "best.safetensors")}}))
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_to_the_end("train", str(config), "--output", str(straight))

    rng = random.Random(SEED)
    kill_points = [  # while starting or in epoch 1; as soon as an epoch is written; in the calibration; anywhere
        after(rng.uniform(2.0, 6.0)),
        epochs_recorded(run, 1),
        epochs_recorded(run, 3),
        after(rng.uniform(0.5, 5.0)),
    ]
    history: list[dict] = []
    kills = 0
    for point in kill_points:
        started = (run / "state.pt").is_file()
        args = ("train", "--resume", str(run)) if started else ("train", str(config), "--output", str(run))
        if kill_when(mvit_process(*args), point):
            kills += 1
        history = check_nothing_silently_wrong(run, 3, history)
    assert kills >= 2
    if (run / "state.pt").is_file():
        run_to_the_end("train", "--resume", str(run))
    else:
        run_to_the_end("train", str(config), "--output", str(run))

    assert without_timings(records(run)) == without_timings(records(straight))
    for name in ("last.safetensors", "best.safetensors"):
        expected, got = load_file(str(straight / name)), load_file(str(run / name))
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    best = mvit.load(run / "best.safetensors")
    assert best.heads == mvit.load(straight / "best.safetensors").heads and best.heads["dermmel"].calibrated
    assert not [p.name for p in run.iterdir() if "partial" in p.name]


def cache_contents(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        (group,) = file.values()
        rows = int(group.attrs["rows"])
        keys = group["keys"][:rows].astype(str)
        assert len(set(keys)) == rows, "an image cached twice"
        return dict(zip(keys, group["features"][:rows]))


def test_extract_killed_at_random_points_then_rerun_caches_every_image_once(tmp_path):
    # more than one committed chunk of 256 images, so a kill can fall between commits
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=90, per_class_eval=40)
    config = write_tiny_config(tmp_path / "config.toml", root, **SETTINGS)
    reference, cache = tmp_path / "straight.h5", tmp_path / "cache.h5"
    run_to_the_end("extract", str(config), "--cache", str(reference))
    expected = cache_contents(reference)

    rng = random.Random(SEED)
    for delay in sorted(rng.uniform(2.0, 6.0) for _ in range(3)):
        kill_when(mvit_process("extract", str(config), "--cache", str(cache)), after(delay))
        if cache.is_file():
            try:
                partial = cache_contents(cache)
            except (OSError, ValueError):
                partial = {}  # a kill inside HDF5's write: the next run moves the file aside and rebuilds it
            assert set(partial) <= set(expected)
    run_to_the_end("extract", str(config), "--cache", str(cache))

    got = cache_contents(cache)
    assert set(got) == set(expected)  # every image, each exactly once (checked in cache_contents)
    for key, features in expected.items():
        # the same image through the same backbone; batches of another composition may round differently
        np.testing.assert_allclose(got[key], features, rtol=1e-4, atol=1e-5)
