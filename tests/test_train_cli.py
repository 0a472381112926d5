"""`mvit train` and `mvit extract` from the command line, one process and two (torchrun, gloo)."""

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mvit
from clirun import call_mvit, run_mvit
from mvit.train import trainer as training
from training_data import make_learnable_dermmel, write_tiny_config


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    root = make_learnable_dermmel(folder / "data", per_class_train=12, per_class_eval=4)
    return write_tiny_config(folder / "config.toml", root, unfreeze={"mode": "gradual", "frozen_epochs": 1},
                             augmentation={"enabled": False}, training={"epochs": 2})


def test_train_command_writes_a_run(config_file, tmp_path, capsys, monkeypatch):
    result = call_mvit(capsys, monkeypatch, "train", str(config_file), "--output", str(tmp_path / "run"), "--epochs", "2")
    assert result.code == 0, result.stderr
    assert "epoch 2/2" in result.stderr
    assert (tmp_path / "run" / "features.h5").is_file()  # frozen, unaugmented epoch read cached features
    assert len(mvit.load(tmp_path / "run" / "best.safetensors").heads) == 1


def test_bad_config_is_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text('output = "x"\n[[datasets]]\nname = "dermmel"\nroot = "/nonexistent"\n[optimizer]\nhead_lr = -1\n')
    result = call_mvit(capsys, monkeypatch, "train", str(path))
    assert result.code == 2
    assert "optimizer.head_lr" in result.stderr and "Traceback" not in result.stderr
    result = call_mvit(capsys, monkeypatch, "train", str(path), "--set", "optimizer.head_lr=0.1")
    assert result.code == 2 and "/nonexistent" in result.stderr


def test_extract_command_fills_the_cache(config_file, tmp_path):
    cache = tmp_path / "features.h5"
    result = run_mvit("extract", str(config_file), "--cache", str(cache), timeout=300)
    assert result.code == 0, result.stderr
    assert cache.is_file() and "computed" in result.stderr
    again = run_mvit("extract", str(config_file), "--cache", str(cache), timeout=300)
    assert "this process computed 0" in again.stderr


def torchrun(*args, env=None):
    """`ARGS` as two processes on the CPU (gloo), as `torchrun --nproc_per_node 2` starts them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def cached_features(cache):
    """fingerprint -> {image sha256: feature (D,)}, asserting no image was committed twice."""
    found = {}
    with h5py.File(cache, "r") as file:
        for fingerprint, group in file.items():
            rows = int(group.attrs["rows"])
            keys = group["keys"][:rows].astype(str)
            assert len(set(keys)) == rows, f"an image was committed twice under {fingerprint}"
            found[fingerprint] = dict(zip(keys, group["features"][:rows]))
    return found


def dermmel_images(config_file):
    return sorted((config_file.parent / "data" / "DermMel").rglob("*.jp*g"))


@pytest.mark.slow
def test_extract_under_torchrun_fills_the_same_cache_as_one_process(config_file, tmp_path, capsys, monkeypatch):
    alone = call_mvit(capsys, monkeypatch, "extract", str(config_file), "--cache", str(tmp_path / "one.h5"))
    assert alone.code == 0, alone.stderr
    shared = torchrun("-m", "mvit", "extract", config_file, "--cache", tmp_path / "two.h5")

    images = {hashlib.sha256(path.read_bytes()).hexdigest() for path in dermmel_images(config_file)}
    one, two = cached_features(tmp_path / "one.h5"), cached_features(tmp_path / "two.h5")
    assert len(one) == 1 and one.keys() == two.keys()  # the same backbone on every rank: the same fingerprint
    (fingerprint,) = one
    assert set(one[fingerprint]) == images  # every image of every split, once
    assert set(two[fingerprint]) == images  # no image dropped by the sharding
    for key, feature in one[fingerprint].items():
        np.testing.assert_allclose(two[fingerprint][key], feature, rtol=1e-4, atol=1e-5)
    said = re.search(r"(\d+) images in .*; this process computed (\d+)", " ".join(shared.stderr.split()))  # rich wraps long lines
    assert said, shared.stderr[-3000:]
    assert int(said[1]) == len(images) and 0 < int(said[2]) < len(images)  # rank 0 did its share, not all of it


def valid_loss(model_file, config_file):
    """Mean cross-entropy of a model file on the whole DermMel validation split, computed afresh."""
    folder = config_file.parent / "data" / "DermMel" / "valid"
    truth = {"Melanoma": "melanoma", "NotMelanoma": "not_melanoma"}
    paths = sorted(folder.rglob("*.jpg"))
    predictions = mvit.load(model_file).predict(paths, head="dermmel")
    return float(np.mean([-np.log(p.probabilities[truth[path.parent.name]]) for path, p in zip(paths, predictions)]))


def metrics_lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def as_multiset(steps):
    """Training steps [[dataset index, sample indices], ...] as a multiset of (dataset, batch)."""
    return Counter((task, tuple(batch)) for task, batch in steps)


@pytest.mark.slow
def test_torchrun_training_shares_the_steps_keeps_ranks_in_step_and_writes_one_run(config_file, tmp_path, capsys, monkeypatch):
    single_steps = {}  # epoch -> the steps one process takes: [dataset index, sample indices]
    real_plan = training.epoch_steps

    def plan(tasks, config, epoch, processes):
        chosen = real_plan(tasks, config, epoch, processes)
        single_steps[epoch] = [[int(task), [int(i) for i in batch]] for task, batch in chosen]
        return chosen

    monkeypatch.setattr(training, "epoch_steps", plan)  # the trainer's own name for it
    alone = call_mvit(capsys, monkeypatch, "train", str(config_file), "--output", str(tmp_path / "one"))
    assert alone.code == 0, alone.stderr
    run, records = tmp_path / "ddp", tmp_path / "ranks"
    records.mkdir()
    torchrun(Path(__file__).parent / "ddp_train.py", "train", config_file, "--output", run,
             env={"MVIT_RANK_RECORDS": str(records)})

    # rank 0 alone wrote the run folder: the same files as one process writes, one metrics line per epoch
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    history, single_history = metrics_lines(run), metrics_lines(tmp_path / "one")
    assert [(h["epoch"], h["unfrozen_groups"]) for h in history] == [(h["epoch"], h["unfrozen_groups"]) for h in single_history]

    # the same model format: heads, classes and tensors as one process trains
    best, single_best = mvit.load(run / "best.safetensors"), mvit.load(tmp_path / "one" / "best.safetensors")
    assert {n: (h.classes, h.positive) for n, h in best.heads.items()} == {n: (h.classes, h.positive) for n, h in single_best.heads.items()}
    tensors, single_tensors = load_file(str(run / "best.safetensors")), load_file(str(tmp_path / "one" / "best.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in single_tensors.items()}

    # each epoch's steps are divided between the ranks: none dropped beyond an odd last one, none taken twice
    steps = [json.loads((records / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
    assert sorted(single_steps) == [0, 1] and sorted(steps[0]) == sorted(steps[1]) == ["0", "1"]  # both epochs recorded
    for epoch, single in single_steps.items():
        rank0_steps, rank1_steps = steps[0][str(epoch)], steps[1][str(epoch)]
        assert len(rank0_steps) == len(rank1_steps) == len(single) // 2
        assert as_multiset(rank0_steps) + as_multiset(rank1_steps) <= as_multiset(single)

    # the ranks ended with the same weights (synchronised gradients), and those are the last model rank 0 wrote
    last = load_file(str(run / "last.safetensors"))
    rank0, rank1 = (load_file(str(records / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and set(rank0) <= set(last)
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=1e-6, msg=name)
        assert torch.equal(rank0[name], last[name]), name

    # the metrics written for the last epoch are those of the saved model on the whole validation split
    assert history[-1]["heads"]["dermmel"]["valid"]["loss"] == pytest.approx(valid_loss(run / "last.safetensors", config_file), rel=1e-3)

