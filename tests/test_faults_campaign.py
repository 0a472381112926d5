"""Issue 20's fault campaign, items 1, 2, 3 and 5: nothing lost, nothing silently wrong.

(1) a full disk under the feature cache is one sentence, and the cache keeps exactly the rows it
had committed; (2) a second run into a run folder in use is refused; (3) cache rows that read but
are wrong (flipped bytes, moved rows, zeros, NaN, a file from before the checksums) are computed
again, never used; (5) a symbolic link that loops is one line, the other inputs are predicted.
docs/reliability.md lists the same faults and promises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clirun import call_mvit, run_mvit
from conftest import TINY
from datasets_factory import write_image
from inference_models import saved_model
from mvit.data import features as features_module
from mvit.data.features import FeatureCache, fingerprint
from mvit.data.images import load_image
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, DiskFull, ImageError, MvitError
from mvit.core.vit import VisionTransformer
from mvit.core.training_images import content_hash
from mvit.train import trainer as training
from mvit.train.run_folder import RunFolder
from training_data import make_learnable_dermmel, paint, tiny_run_config, write_tiny_config

PRE = Preprocessing(image_size=32, crop_fraction=1.0)
CPU = torch.device("cpu")


def backbone() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY).eval()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [folder / f"img{i}.jpg" for i in range(10)]
    for i, path in enumerate(paths):
        paint(path, i % 3)
    return paths


def direct(net, paths) -> torch.Tensor:
    """The backbone's features of `paths`, computed here and not through the cache (N, D)."""
    with torch.no_grad():
        return net(torch.stack([eval_transform(PRE)(load_image(p)) for p in paths]))


def committed(path: Path) -> dict[str, np.ndarray]:
    """image key -> feature of every committed row, read with h5py alone (no duplicate keys)."""
    with h5py.File(path, "r") as file:
        found = {}
        for group in file.values():
            rows = int(group.attrs["rows"])
            keys = group["keys"][:rows].astype(str)
            assert len(set(keys)) == rows, "an image cached twice"
            found.update(zip(keys, group["features"][:rows]))
        return found


def one_sentence(result, code: int = 2) -> str:
    """The stderr of a failed command: one `error:` line, no traceback, no HDF5 diagnostics, no crash;
    exit status 2 for a mistake, 3 for a full disk."""
    assert result.code == code, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "HDF5" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return " ".join(result.stderr.split())


# ---- (1) a full disk under the feature cache


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("point, kept", [("claim", 4), ("write", 4), ("flush", 4), ("close", 8)])
def test_a_full_disk_at_any_write_is_one_sentence_and_keeps_the_rows_committed(tmp_path, images, monkeypatch, point, kept):
    """The second commit of 4 rows meets a full disk at `point`: one sentence, and the cache holds
    the rows committed before it (`close`: after the rows were flushed, so all 8), each right."""
    monkeypatch.setattr(features_module, "CHUNK", 4)
    net, path = backbone(), tmp_path / "cache.h5"
    real_commit, real_setitem, real_flush, real_close = FeatureCache._commit, h5py.Dataset.__setitem__, h5py.File.flush, h5py.File.close
    armed = []

    def commit(self, *args):
        armed.append(len(armed) == 1)  # the second commit
        try:
            real_commit(self, *args)
        finally:
            armed[-1] = False

    def setitem(dataset, where, value):
        if armed and armed[-1] and dataset.name.endswith("features"):
            _enospc()
        real_setitem(dataset, where, value)

    def flush(file):
        if armed and armed[-1]:
            _enospc()
        real_flush(file)

    def close(file):
        real_close(file)
        if armed and armed[-1]:
            _enospc()

    monkeypatch.setattr(FeatureCache, "_commit", commit)
    if point == "claim":
        monkeypatch.setattr(os, "posix_fallocate", lambda *args: _enospc() if armed[-1] else None)
    else:
        patched = {"write": ("Dataset", "__setitem__", setitem), "flush": ("File", "flush", flush), "close": ("File", "close", close)}
        owner, name, replacement = patched[point]
        monkeypatch.setattr(getattr(h5py, owner), name, replacement)

    with pytest.raises(DiskFull, match="the disk is full; free some space") as raised:  # exit status 3
        FeatureCache(path).extract(net, PRE, images, device=CPU, batch_size=4)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    monkeypatch.undo()

    rows = committed(path)
    assert len(rows) == kept
    expected = dict(zip([content_hash(p) for p in images], direct(net, images).numpy()))
    for key, feature in rows.items():
        np.testing.assert_allclose(feature, expected[key], atol=1e-5, rtol=1e-5)
    warnings = []
    assert FeatureCache(path, warn=warnings.append).extract(net, PRE, images, device=CPU, batch_size=4) == 10 - kept
    assert not warnings and len(committed(path)) == 10


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (root only; the test is skipped where it cannot be mounted)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of `disk`'s free space but `leave` bytes."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as file:
        left = stats.f_bavail * stats.f_frsize - leave
        while left > 0:
            left -= file.write(b"\0" * min(left, 1 << 20))
    return filler


@pytest.fixture
def extract_config(tmp_path):
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=6, per_class_eval=3)
    return write_tiny_config(tmp_path / "config.toml", root, output=str(tmp_path / "run")), root


def dermmel_images(root: Path) -> list[Path]:
    return sorted((root / "DermMel").rglob("*.jp*g"))


def test_extract_on_a_96k_disk_is_one_sentence_and_runs_once_there_is_room(tmp_path, extract_config):
    config, root = extract_config
    with small_disk(tmp_path / "disk", "96k") as disk:
        cache = disk / "features.h5"
        text = one_sentence(run_mvit("extract", str(config), "--cache", str(cache), timeout=300), code=3)
        assert "the disk is full" in text and str(cache) in text
        assert not cache.exists() or committed(cache) == {}  # a readable cache with nothing in it
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        again = run_mvit("extract", str(config), "--cache", str(cache), timeout=300)
        assert again.code == 0, again.stderr
        assert "damaged" not in again.stderr
        assert set(committed(cache)) == {content_hash(p) for p in dermmel_images(root)}


def test_a_disk_that_fills_during_extract_keeps_every_feature_cached_before(tmp_path, extract_config):
    config, root = extract_config
    with small_disk(tmp_path / "disk", "2m") as disk:
        cache = disk / "features.h5"
        first = run_mvit("extract", str(config), "--cache", str(cache), timeout=300)
        assert first.code == 0, first.stderr
        before = committed(cache)
        for k in range(40):  # more images arrive; the disk has room for few of them
            paint(root / "DermMel" / "train_sep" / "Melanoma" / f"ISIC_{9_000_000 + k}.jpg", 0)
        filler = fill(disk, leave=48 * 1024)
        text = one_sentence(run_mvit("extract", str(config), "--cache", str(cache), timeout=300), code=3)
        assert "the disk is full" in text
        after = committed(cache)
        assert after.keys() == before.keys()
        assert all(np.array_equal(after[k], before[k]) for k in before)  # bit for bit, and no zero rows
        filler.unlink()
        again = run_mvit("extract", str(config), "--cache", str(cache), timeout=300)
        assert again.code == 0, again.stderr
        assert set(committed(cache)) == {content_hash(p) for p in dermmel_images(root)}


# ---- (2) two runs into one run folder


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_sentence(tmp_path, extract_config):
    config_file, root = extract_config
    run = tmp_path / "run"
    first = training.Trainer(tiny_run_config(root, run, {"training": {"epochs": 2}}))  # holds the folder from here
    try:
        with pytest.raises(ConfigError, match="in use by another training run"):
            training.Trainer(tiny_run_config(root, run, {"training": {"epochs": 2, "seed": 7}}))
        with pytest.raises(ConfigError, match="in use by another training run"):
            training.resume(run)
        for args in (["train", str(config_file), "--output", str(run), "--set", "training.seed=7"], ["train", "--resume", str(run)]):
            text = one_sentence(run_mvit(*args, timeout=300))
            assert f"{run} is in use by another training run" in text
        first.run()
    finally:
        first.folder.release()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # one run's epochs, not two runs' mixed
    assert json.loads((run / "config.json").read_text())["training"]["seed"] == first.config.training.seed


def test_the_folder_is_free_again_when_a_run_ends_however_it_ends(tmp_path, extract_config):
    _, root = extract_config
    run = tmp_path / "run"
    config = tiny_run_config(root, run, {"training": {"epochs": 2}})
    real_epoch = training.Trainer._train_epoch

    def interrupted(self, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Trainer, "_train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            training.train(config)
    training.resume(run)  # the interrupted run let go of its folder
    folder = RunFolder(run)
    folder.lock()  # and so did the resumed one
    folder.release()


# ---- (3) cache rows that read but are wrong


def damage(path: Path, how: str) -> int:
    """Damage the committed rows of the cache's one group as `how` says; returns how many rows."""
    with h5py.File(path, "r+") as file:
        (group,) = file.values()
        features, sums = group["features"], group.get("checksums")  # (none in a cache from before them)
        if how == "flipped byte":
            row = features[3]
            raw = bytearray(row.tobytes())
            raw[5] ^= 0x40
            features[3] = np.frombuffer(bytes(raw), dtype=np.float32)
            return 1
        if how == "zeros":  # what a chunk that a full disk never wrote reads as
            features[2] = 0
            if sums is not None:
                sums[2] = 0
            return 1
        if how == "nan":
            features[4] = np.nan
            return 1
        if how == "features swapped":
            features[1], features[6] = features[6], features[1]
            return 2
        if how == "rows swapped but not their keys":
            features[1], features[6] = features[6], features[1]
            if sums is not None:
                sums[1], sums[6] = sums[6], sums[1]
            return 2
    raise ValueError(how)


@pytest.mark.parametrize("how", ["flipped byte", "zeros", "nan", "features swapped", "rows swapped but not their keys"])
def test_damaged_rows_are_computed_again_with_one_warning(tmp_path, images, how):
    net, path = backbone(), tmp_path / "cache.h5"
    FeatureCache(path).extract(net, PRE, images, device=CPU, batch_size=4)
    count = damage(path, how)
    warnings = []
    cache = FeatureCache(path, warn=warnings.append)
    loaded = cache.load(net, PRE, images, device=CPU, batch_size=4)
    torch.testing.assert_close(loaded, direct(net, images), atol=1e-5, rtol=1e-5)
    assert len(warnings) == 1 and f"{count} row{'s' if count > 1 else ''} of the feature cache" in warnings[0], warnings
    cache.load(net, PRE, images, device=CPU, batch_size=4)
    assert len(warnings) == 1  # once
    again = []
    assert FeatureCache(path, warn=again.append).extract(net, PRE, images, device=CPU) == 0  # written over, in place
    assert not again and len(committed(path)) == 10


def test_a_cache_from_before_the_checksums_is_moved_aside_and_rebuilt(tmp_path, images):
    net, path = backbone(), tmp_path / "cache.h5"
    FeatureCache(path).extract(net, PRE, images, device=CPU, batch_size=4)
    with h5py.File(path, "r+") as file:
        (group,) = file.values()
        del group["checksums"]  # the layout an mvit from before the checksums wrote
    warnings = []
    assert FeatureCache(path, warn=warnings.append).extract(net, PRE, images, device=CPU, batch_size=4) == 10
    assert len(warnings) == 1 and "older mvit" in warnings[0]
    assert list(tmp_path.glob("cache.h5.damaged-*")) and len(committed(path)) == 10


def test_a_backbone_that_gives_non_finite_features_is_one_sentence_and_caches_nothing(tmp_path, images):
    net, path = backbone(), tmp_path / "cache.h5"
    with torch.no_grad():
        net.final_norm.weight[0] = math.inf
    with pytest.raises(MvitError, match="not finite"):
        FeatureCache(path).extract(net, PRE, images, device=CPU, batch_size=4)
    assert not path.exists() or committed(path) == {}


def test_nan_features_in_the_cache_never_reach_the_training_metrics(tmp_path, extract_config):
    _, root = extract_config
    cache = tmp_path / "features.h5"
    layers = {"unfreeze": {"mode": "gradual", "frozen_epochs": 1}, "augmentation": {"enabled": False},
              "training": {"epochs": 1}, "runtime": {"feature_cache": str(cache)}}
    training.train(tiny_run_config(root, tmp_path / "first", layers))
    with h5py.File(cache, "r+") as file:
        for group in file.values():
            group["features"][:] = np.nan
    warnings = []
    trainer = training.Trainer(tiny_run_config(root, tmp_path / "second", layers))
    trainer.cache.warn = warnings.append
    trainer.run()
    (record,) = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    for head in record["heads"].values():
        assert math.isfinite(head["train"]["loss"]) and math.isfinite(head["valid"]["loss"])
        assert math.isfinite(head["valid"]["balanced_accuracy"])
    assert warnings and "failed" in warnings[0]


# ---- (5) one bad input among many


def test_a_symbolic_link_that_loops_is_one_line_and_the_other_images_are_predicted(tmp_path, capsys, monkeypatch):
    good = [write_image(tmp_path / f"good{k}.jpg") for k in (1, 2)]
    loop = tmp_path / "y.jpg"
    loop.symlink_to("y.jpg")
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        load_image(loop)
    result = call_mvit(capsys, monkeypatch, "predict", "-m", str(saved_model(tmp_path)), "-H", "all", "-f", "json",
                       *map(str, [*good, loop]))
    assert result.code == 1 and "Traceback" not in result.stderr
    assert sorted({r["image"] for r in json.loads(result.stdout)}) == sorted(map(str, good))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(loop) in errors[0]
    assert "1 of 3 images could not be read" in result.stderr
