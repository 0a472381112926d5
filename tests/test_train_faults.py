"""Training's faults: nothing lost, nothing silently wrong, never a traceback (issue 11).

A run folder is addressed by where it is; model files written before the end-of-run calibration
carry no operating point; a validation split that cannot calibrate a head is refused up front; bad
images follow the chosen policy whatever the worker count; damaged state and model files, unwritable
outputs and a full disk are one sentence and leave the finished epochs' files whole; a plugin's own
split names are used; `--set` errors name the option.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import mvit
from clirun import run_mvit
from datasets_factory import truncate
from mvit.errors import ConfigError, MvitError
from mvit.datasets import leakage
from mvit.registry import DatasetSpec, HeadSpec, Sample, hookimpl, manager
from mvit.train import trainer as training
from mvit.train.config import load_config
from training_data import interrupted_run, make_learnable_dermmel, paint, tiny_run_config, write_tiny_config


@pytest.fixture(scope="module")
def dermmel_root(tmp_path_factory):
    return make_learnable_dermmel(tmp_path_factory.mktemp("dermmel"), per_class_train=8, per_class_eval=4)


def tiny_config(root, output, **sections):
    return tiny_run_config(root, output, {"augmentation": {"enabled": False}, "training": {"epochs": 3}}, sections)


def config_file(folder: Path, root: Path, *, mode: str = "all", epochs: int = 2, workers: int = 0) -> Path:
    return write_tiny_config(folder / "config.toml", root, unfreeze={"mode": mode}, augmentation={"enabled": False},
                             training={"epochs": epochs, "early_stopping": 100}, runtime={"workers": workers})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(result) -> str:
    """The stderr of a failed command: one `error:` line and no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def stopped_run(dermmel_root, tmp_path_factory):
    """A run of 3 epochs stopped after its first: one finished epoch in its folder."""
    with pytest.MonkeyPatch.context() as patch:
        return interrupted_run(tiny_config(dermmel_root, tmp_path_factory.mktemp("stopped") / "run"), 1, patch)


# ---- (1) a run folder is addressed by where it is


@pytest.mark.slow
def test_resuming_a_copy_trains_the_copy_and_leaves_the_original_byte_identical(stopped_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(stopped_run, original)
    before = digests(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    result = run_mvit("train", "--resume", str(copy))
    assert result.code == 0, result.stderr
    assert digests(original) == before  # config.json still names original's old place: not used
    assert [h["epoch"] for h in metrics(copy)] == [1, 2, 3]
    assert mvit.load(copy / "best.safetensors").heads["dermmel"].calibrated


def test_a_resume_clears_what_a_run_killed_with_minus_9_was_writing(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    leftover = run / ".last.safetensors.4242.partial"  # the shape `written_aside` leaves under kill -9
    leftover.mkdir()
    (leftover / "last.safetensors").write_bytes(b"half a model")
    result = run_mvit("train", "--resume", str(run))
    assert result.code == 0, result.stderr
    assert not [p.name for p in run.iterdir() if "partial" in p.name]
    assert [h["epoch"] for h in metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_a_moved_run_reads_only_its_own_files(stopped_run, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(stopped_run, new)
    (new / "config.json").write_text((new / "config.json").read_text().replace(str(stopped_run), str(old)))
    # another run now stands at the old place: its files must be neither read nor written
    shutil.copytree(stopped_run, old)
    (old / "state.pt").write_bytes(b"another run's state")
    truncate(old / "best.safetensors", keep=100)
    before = digests(old)
    result = run_mvit("train", "--resume", str(new))
    assert result.code == 0, result.stderr
    assert digests(old) == before
    assert [h["epoch"] for h in metrics(new)] == [1, 2, 3]


# ---- (2) no operating point before calibration


def test_a_model_saved_before_calibration_carries_no_operating_point(dermmel_root, tmp_path, monkeypatch):
    first = training.train(tiny_config(dermmel_root, tmp_path / "first", training={"epochs": 1}))
    init = mvit.load(first).heads["dermmel"]
    assert init.calibrated and init.threshold is not None
    # fine-tune from it; the run is killed as calibration starts
    config = tiny_config(dermmel_root, tmp_path / "second", backbone={"init": str(first)}, training={"epochs": 2})

    def killed(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "_calibrate_and_save", killed)
        with pytest.raises(KeyboardInterrupt):
            training.train(config)
    for name in ("best.safetensors", "last.safetensors"):
        head = mvit.load(tmp_path / "second" / name).heads["dermmel"]
        assert head.calibrated is False, name
        assert head.threshold is None and head.threshold_target is None and head.temperature == 1.0, name
    training.resume(tmp_path / "second")
    head = mvit.load(tmp_path / "second" / "best.safetensors").heads["dermmel"]
    assert head.calibrated and head.threshold is not None and head.threshold_target is not None


def test_a_full_disk_during_the_calibration_save_leaves_the_uncalibrated_best(dermmel_root, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    real_save = safetensors.torch.save_file
    trainer = training.Trainer(tiny_config(dermmel_root, run, training={"epochs": 1}))

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")  # what a full disk leaves of the file being written
        raise OSError(errno.ENOSPC, "No space left on device")

    real_calibrate = training.Trainer._calibrate_and_save

    def calibrate_on_a_full_disk(self):
        with monkeypatch.context() as patch:
            patch.setattr(safetensors.torch, "save_file", full_disk)
            real_calibrate(self)

    monkeypatch.setattr(training.Trainer, "_calibrate_and_save", calibrate_on_a_full_disk)
    with pytest.raises(MvitError, match="disk is full"):
        trainer.run()
    assert safetensors.torch.save_file is real_save
    head = mvit.load(run / "best.safetensors").heads["dermmel"]  # the epoch's file, whole
    assert head.calibrated is False and head.threshold is None
    assert not [p.name for p in run.iterdir() if "partial" in p.name]


def test_a_full_disk_while_saving_an_epoch_keeps_the_previous_files(dermmel_root, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    real_save = safetensors.torch.save_file
    saved = []

    def full_disk_in_epoch_2(tensors, filename, metadata=None):
        saved.append(filename)
        if len(metrics(run)) == 2:  # epoch 2's record is written; its model files are not
            Path(filename).write_bytes(b"half a model")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_in_epoch_2)
    with pytest.raises(MvitError, match="disk is full") as raised:
        training.train(tiny_config(dermmel_root, run, training={"epochs": 3}))
    assert str(run / "last.safetensors") in str(raised.value)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert mvit.load(run / "last.safetensors").provenance["epoch"] == 1  # epoch 1's, whole
    assert not [p.name for p in run.iterdir() if "partial" in p.name]
    training.resume(run)  # and the run goes on from its last finished epoch
    assert [h["epoch"] for h in metrics(run)] == [1, 2, 3]
    assert mvit.load(run / "best.safetensors").heads["dermmel"].calibrated


# ---- (3) a validation split that cannot calibrate is refused up front


def test_a_binary_head_without_a_validation_positive_is_refused_before_the_first_epoch(tmp_path):
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=6, per_class_eval=3)
    for image in (root / "DermMel" / "valid" / "Melanoma").iterdir():
        image.unlink()
    result = run_mvit("train", str(config_file(tmp_path, root, epochs=1)), "--output", str(tmp_path / "run"))
    text = one_sentence(result)
    assert "head dermmel" in text and "melanoma" in text and "valid split" in text and "dataset dermmel" in text
    assert "epoch 1" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_onto_a_split_that_lost_its_positives_is_refused_before_any_epoch(dermmel_root, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(dermmel_root, data)
    run = interrupted_run(tiny_config(data, tmp_path / "run"), 1, monkeypatch)
    shutil.rmtree(data / "DermMel" / "valid" / "Melanoma")
    with pytest.raises(ConfigError, match="head dermmel has no melanoma image in the valid split"):
        training.resume(run)
    assert [h["epoch"] for h in metrics(run)] == [1]


def test_calibration_never_raises_a_bare_value_error():
    from mvit.train.final_calibration import calibrate_heads
    from mvit.train.config import CalibrationConfig
    from conftest import tiny_model

    model = tiny_model()
    logits, targets = torch.randn(6, 2), torch.ones(6, dtype=torch.long)  # no melanoma among them
    with pytest.raises(ConfigError, match="head mel cannot be calibrated on the valid split of dataset toy: no melanoma"):
        calibrate_heads(model, {"mel": (logits, targets)}, CalibrationConfig(), datasets={"mel": "the valid split of dataset toy"})
    with pytest.raises(ConfigError, match="no readable images"):
        calibrate_heads(model, {"three": (torch.empty(0, 3), torch.empty(0, dtype=torch.long))}, CalibrationConfig())


# ---- (6) bad images, damaged files, unwritable outputs


@pytest.fixture(scope="module")
def damaged_training_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    root = make_learnable_dermmel(folder / "data", per_class_train=6, per_class_eval=3)
    bad = sorted((root / "DermMel" / "train_sep" / "Melanoma").glob("ISIC_*.jpg"))[0]
    truncate(bad, keep=400)
    return folder, root, bad


@pytest.mark.parametrize("mode", ["all", "none"])  # images decoded for each step / features from the cache
def test_a_bad_training_image_stops_with_one_sentence_whatever_the_worker_count(damaged_training_image, mode):
    folder, root, bad = damaged_training_image
    config = config_file(folder, root, mode=mode, epochs=1, workers=2)
    result = run_mvit("train", str(config), "--output", str(folder / f"stop-{mode}"))
    text = one_sentence(result)
    assert bad.name in text and "damaged or incomplete" in text


def test_a_bad_training_image_is_skipped_and_counted_when_asked(damaged_training_image):
    folder, root, bad = damaged_training_image
    config = config_file(folder, root, mode="all", epochs=2, workers=2)
    run = folder / "skip"
    result = run_mvit("train", str(config), "--output", str(run), "--set", "runtime.bad_images=skip")
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert said.count("left out 1 unreadable image") == 2 and bad.name in said  # at the end of each epoch
    assert [h.get("skipped_images") for h in metrics(run)] == [1, 1]
    assert mvit.load(run / "best.safetensors").heads["dermmel"].calibrated


def test_extract_follows_the_bad_image_policy(damaged_training_image, tmp_path):
    import h5py

    folder, root, bad = damaged_training_image
    config = config_file(folder, root, mode="none", epochs=1, workers=2)
    text = one_sentence(run_mvit("extract", str(config), "--cache", str(tmp_path / "stop.h5")))
    assert bad.name in text
    cache = tmp_path / "skip.h5"
    result = run_mvit("extract", str(config), "--cache", str(cache), "--set", 'runtime.bad_images="skip"')
    assert result.code == 0, result.stderr
    assert "left out 1 unreadable image" in " ".join(result.stderr.split())
    images = [p for p in (root / "DermMel").rglob("*") if p.suffix in (".jpg", ".jpeg")]
    with h5py.File(cache) as file:
        (group,) = file.values()
        assert int(group.attrs["rows"]) == len(images) - 1


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "not ours"])
def test_a_damaged_state_file_is_one_sentence_on_resume(stopped_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    state = run / "state.pt"
    if damage == "zero bytes":
        state.write_bytes(b"")
    elif damage == "truncated":
        truncate(state, keep=state.stat().st_size // 2)
    else:
        torch.save({"something": torch.zeros(2)}, state)
    text = one_sentence(run_mvit("train", "--resume", str(run)))
    assert "state.pt" in text


def test_a_damaged_best_model_is_found_at_the_start_of_a_resume(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    truncate(run / "best.safetensors", keep=300)
    last = (run / "last.safetensors").read_bytes()
    text = one_sentence(run_mvit("train", "--resume", str(run)))
    assert "best.safetensors" in text
    assert [h["epoch"] for h in metrics(run)] == [1]  # no epoch was trained for nothing
    assert (run / "last.safetensors").read_bytes() == last


@pytest.mark.slow
def test_an_output_under_a_regular_file_is_one_sentence(dermmel_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = config_file(tmp_path, dermmel_root, epochs=1)
    text = one_sentence(run_mvit("train", str(config), "--output", str(blocker / "run")))
    assert "a-file" in text
    text = one_sentence(run_mvit("extract", str(config), "--cache", str(blocker / "features.h5")))
    assert "a-file" in text


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_on_a_read_only_path_is_one_sentence(dermmel_root, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    config = config_file(tmp_path, dermmel_root, epochs=1)
    parent.chmod(0o555)
    try:
        text = one_sentence(run_mvit("train", str(config), "--output", str(parent / "run")))
        assert "read-only" in text or "not writable" in text
        text = one_sentence(run_mvit("extract", str(config), "--cache", str(parent / "features.h5")))
        assert "read-only" in text or "not writable" in text
    finally:
        parent.chmod(0o755)


# ---- (8) split names, --root, --set


class FitTuneHoldout:
    """A dataset whose splits are named fit, tune and holdout (official, from its folders)."""

    @hookimpl
    def register_datasets(self, register):
        def load(root: Path) -> list[Sample]:
            return [Sample(path=p, label=p.parent.name, group=p.stem, split=p.parent.parent.name)
                    for p in sorted(Path(root).glob("*/*/*.jpg"))]

        register(DatasetSpec(name="named", title="named splits", labels=("a", "b"), splits=("fit", "tune", "holdout"),
                             official_splits=True, split_fractions={"fit": 0.6, "tune": 0.2, "holdout": 0.2}, load=load))

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="named", dataset="named", classes=("a", "b"), positive="a"))


def test_a_plugins_own_split_names_are_used(tmp_path):
    root = tmp_path / "named"
    for split, count in (("fit", 8), ("tune", 3), ("holdout", 3)):
        for index, label in enumerate(("a", "b")):
            (root / split / label).mkdir(parents=True)
            for n in range(count):
                paint(root / split / label / f"{split}{label}{n}.jpg", index)
    shutil.copy(root / "fit" / "a" / "fita0.jpg", root / "holdout" / "a" / "copy.jpg")  # leaks into holdout
    config = tiny_config(root, tmp_path / "run", datasets=[{"name": "named", "root": str(root)}], training={"epochs": 1})
    from mvit.train.tasks import TRAIN, VALID, build_tasks

    with manager.temporary_plugins(FitTuneHoldout()):
        said = []
        (task,) = build_tasks(config, said.append)
        assert task.roles == {TRAIN: "fit", VALID: "tune"}
        assert len(task.samples(TRAIN)) == 15 and len(task.samples(VALID)) == 6  # the leaking image is out
        assert said and "kept 1 training images out" in said[0]
        model = mvit.load(training.train(config))
    assert model.heads["named"].calibrated and model.heads["named"].threshold is not None
    # the leakage check, without a registry: each mapping's first split is its training split
    a, twin = root / "fit" / "a" / "fita0.jpg", root / "holdout" / "a" / "copy.jpg"
    cleaned, report = leakage.exclude_shared({"named": {"fit": [Sample(path=a, label="a", group="1")],
                                                        "holdout": [Sample(path=twin, label="a", group="2")]}})
    assert cleaned["named"]["fit"] == [] and len(report.excluded) == 1


def test_train_says_how_to_set_a_dataset_root(tmp_path):
    config = config_file(tmp_path, tmp_path / "nowhere", epochs=1)
    text = one_sentence(run_mvit("train", str(config)))
    assert "--root" not in text
    assert "datasets.0.root" in text and "--set" in text


def test_set_errors_name_the_option_not_the_config(dermmel_root, tmp_path):
    config = config_file(tmp_path, dermmel_root, epochs=1)
    with pytest.raises(ConfigError, match=r"^--set training.epochs=-1: training.epochs"):
        load_config(config, ["training.epochs=-1"])
    with pytest.raises(ConfigError, match=r"^--set training.epoch=3: training.epoch"):
        load_config(config, ["training.epoch=3"])
    config.write_text(config.read_text().replace("epochs = 1", "epochs = 0"))
    with pytest.raises(ConfigError, match=r"config.toml: training.epochs"):  # the file's own mistake
        load_config(config, ["training.batch_size=4"])
    text = one_sentence(run_mvit("train", str(config), "--set", "training.batch_size=big", "--set", "training.epochs=1"))
    assert "--set training.batch_size=big" in text and "config.toml" not in text
