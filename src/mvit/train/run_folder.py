"""The run folder and its files: config.json, metrics.jsonl, last/best model files (with their
provenance), curves.png, and state.pt, which lets `--resume` continue exactly where a run stopped.

A run folder is addressed by where it is, never by where it was: `--resume DIR` reads and writes
DIR's files only, whatever output its config.json recorded (a copied run resumes into the copy, a
moved one reads only its own files). Every file is written aside and renamed into place, so a kill
or a full disk leaves the previous version whole; a write that fails is one sentence. A run holds
its folder with an exclusive lock (on `.lock` inside it) from its start or resume to its end, so a
second run into the same folder is refused instead of mixing its files with the first one's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import pickle
from pathlib import Path
from typing import Iterator

import torch

from mvit.errors import ConfigError, DiskFull, ModelFileError, MvitError
from mvit.runtime.files import remove_partials, written_aside
from mvit.core import model_file
from mvit.core.model import Model
from mvit.core.training_images import TrainingImages, recorded_training_images
from mvit.train.config import TrainConfig, apply_overrides, validate_config

# what a resumed run may change: how long it trains and how this machine runs it, never what it learns
RESUMABLE = ("training.epochs", "training.early_stopping", "runtime.", "logging.")

STATE_FILE = "state.pt"
LOCK_FILE = ".lock"  # locked (flock) while a run writes the folder; the file itself says nothing
STATE_KEYS = ("epoch", "model", "optimizer", "schedule", "best_score", "best_epoch", "bad_epochs")
# what a head carries until the end-of-run calibration fits it for these weights
UNCALIBRATED = {"temperature": 1.0, "threshold": None, "threshold_target": None, "calibrated": False}


class RunFolder:
    """The files of one run, under `path` (only rank 0 writes them)."""

    def __init__(self, path: Path, *, half: bool = False):
        self.path = Path(path)
        self.half = half  # model files stored as float16 (as small as the bundled model's)
        self.metrics = self.path / "metrics.jsonl"
        self.last, self.best = self.path / "last.safetensors", self.path / "best.safetensors"
        self.state = self.path / STATE_FILE
        self._lock = None  # the open lock file while this process holds the folder

    def start(self, config: TrainConfig) -> None:
        """A new run: takes the folder, refuses one that holds a run, writes config.json and an empty metrics.jsonl."""
        with self.writing(self.path, "the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        self.check_writable()
        self.lock()  # first: a run still writing here is refused as in use, not as one to resume
        if self.state.exists():
            self.release()
            raise ConfigError(f"{self.path} already holds a run; resume it with `mvit train --resume {self.path}` or choose another output")
        self._write_text(self.path / "config.json", config.model_dump_json(indent=2))
        self._write_text(self.metrics, "")

    def lock(self) -> None:
        """Hold the folder until `release` (or this process ends): a second run into it is refused,
        whether it starts or resumes. Only the process that writes the folder (rank 0) takes it."""
        if self._lock is not None:
            return
        path = self.path / LOCK_FILE
        with self.writing(path, "the run folder's lock file"):
            handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{self.path} is in use by another training run; wait for it to finish, "
                              f"or choose another output (--output DIR)") from None
        self._lock = handle
        remove_partials(self.path)  # a run killed with -9 left them; no one else writes here now

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def check_writable(self) -> None:
        """The folder exists and takes new files (checked before any work that would be lost)."""
        if not self.path.is_dir():
            raise ConfigError(f"{self.path} is not a folder; give the run folder itself")
        probe = self.path / f".write-test.{os.getpid()}"
        with self.writing(self.path, "the run folder"):
            probe.write_bytes(b"")
            probe.unlink()

    def append(self, record: dict) -> None:
        """One more line of metrics.jsonl (the file is rewritten aside and renamed: never half a line)."""
        text = self.metrics.read_text() if self.metrics.is_file() else ""
        self._write_text(self.metrics, text + json.dumps(record) + "\n")

    def history(self, done: int, *, rewrite: bool) -> list[dict]:
        """The records of the first `done` epochs; `rewrite`: drop the later ones from metrics.jsonl."""
        lines = self.metrics.read_text().splitlines() if self.metrics.is_file() else []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an older mvit's interrupted write
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append(record)
        if records and records[0]["epoch"] == 0:  # numbered from 0, as mvit wrote it before: renumbered
            records = [{**record, "epoch": record["epoch"] + 1} for record in records]
        # an epoch that finished its metrics but not its state is run again
        history = [record for record in records if record["epoch"] <= done]
        if rewrite:
            self._write_text(self.metrics, "".join(json.dumps(h) + "\n" for h in history))
        return history

    def plot(self, history: list[dict], best_metric: str) -> None:
        from mvit.plots import plot_training_curves

        target = self.path / "curves.png"
        with self.writing(target, "the training curves"):
            plot_training_curves(history, target, best_metric)  # written aside and renamed by the plot itself

    def save_state(self, state: dict) -> None:
        """Written aside, then renamed: an interrupted write leaves the previous state whole."""
        with self.writing(self.state, "the training state"), written_aside(self.state) as partial:
            with open(partial, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())

    def load_state(self, device: torch.device) -> dict:
        if not self.state.is_file():
            raise ConfigError(f"{self.path} holds no training state to resume (no {STATE_FILE})")
        damaged = (f"{self.state} is damaged or incomplete, so the run cannot resume from it; "
                   f"start the run again (its last finished epochs' models are still in {self.path})")
        if self.state.stat().st_size == 0:
            raise ModelFileError(damaged.replace("damaged or incomplete", "empty (0 bytes)"))
        try:
            state = torch.load(self.state, map_location=device, weights_only=True)  # our own file: tensors and numbers
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
            if isinstance(error, PermissionError):
                raise ModelFileError(f"{self.state} cannot be read (permission denied)") from None
            raise ModelFileError(damaged) from None
        if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
            raise ModelFileError(damaged)
        return state

    def check_best(self, best_epoch: int) -> None:
        """At a resume, before any epoch: the best model so far must still load (a damaged one would
        otherwise be found only at the end, after every remaining epoch)."""
        if best_epoch < 0:
            return
        if not self.best.is_file():
            raise ModelFileError(f"{self.best} is missing, so the run's best model so far is lost; "
                                 f"restore it, or start the run again")
        try:
            model_file.load(self.best)
        except MvitError as error:
            raise ModelFileError(f"the run's best model so far cannot be read ({error}); restore {self.best.name}, "
                                 f"or start the run again") from None

    def save_model(self, model: Model, path: Path, heads: dict, provenance: dict) -> None:
        """The model file, each head carrying its validation metrics (`heads`: name -> {"valid": {...}}).

        The heads trained here carry no operating point until the end-of-run calibration fits one for
        these weights: temperature 1, no threshold, `calibrated` False (never an init model's)."""
        for name, head in heads.items():
            model.update_head(name, **UNCALIBRATED, metrics={f"valid_{k}": v for k, v in head["valid"].items()
                                                             if isinstance(v, (int, float)) and math.isfinite(v)})
        with self.writing(path, "the model"):
            model_file.save(model, path, half=self.half, provenance=provenance)

    def save_calibrated(self, model: Model, provenance: dict) -> None:
        with self.writing(self.best, "the calibrated best model"):
            model_file.save(model, self.best, half=self.half, provenance=provenance)

    # ---- writing

    def _write_text(self, path: Path, text: str) -> None:
        with self.writing(path, path.name), written_aside(path) as partial:
            partial.write_text(text)

    @contextlib.contextmanager
    def writing(self, path: Path, what: str) -> Iterator[None]:
        """A write that fails (disk full, read-only, a file where a folder should be) is one sentence.
        Every file of the folder is written aside (`mvit.runtime.files.written_aside`), so none is left
        half-written and the files already written stay as they were."""
        try:
            yield
        except Exception as error:
            reason = write_failure(error) if isinstance(error, Exception) else None
            if reason is None:
                raise
            kind = DiskFull if reason.startswith(DISK_FULL) else MvitError
            raise kind(f"cannot write {what} {path}: {reason}") from None


DISK_FULL = "the disk is full"


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in words; None for an error that is not about the disk (a bug)."""
    text = str(error)
    number = getattr(error, "errno", None)
    if number == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return f"{DISK_FULL}; free some space (the files of the last finished epoch are intact) and resume the run"
    if not isinstance(error, OSError) and "os error" not in text:
        return None
    if number in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only" in text or "Permission denied" in text:
        return "the folder is read-only or not writable; choose another output (--output DIR)"
    if number in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a folder should be; choose another output (--output DIR)"
    return f"{getattr(error, 'strerror', None) or text}"


def open_run(run: Path, overrides: list[str] = ()) -> TrainConfig:
    """The config of the run folder `run`, addressed where it is now: its output is `run` (and a
    feature cache that lived inside the folder is the one inside `run`), whatever config.json recorded;
    with `overrides` (`dotted.key=value`) of what a resumed run may change (RESUMABLE)."""
    run = Path(run).absolute()
    raw = _read_run_config(run)
    recorded = validate_config(json.loads(json.dumps(raw)), source=str(run / "config.json"))
    config = validate_config(raw, source=str(run / "config.json"), overridden=apply_overrides(raw, list(overrides)))
    _check_resumable(recorded, config, overrides)
    cache = config.runtime.feature_cache
    if cache is not None and cache == recorded.runtime.feature_cache and Path(cache).is_relative_to(recorded.output):
        cache = run / Path(cache).relative_to(recorded.output)  # the folder's own cache, moved with it
    runtime = config.runtime.model_copy(update={"feature_cache": cache})
    return config.model_copy(update={"output": run, "runtime": runtime})


def _check_resumable(recorded: TrainConfig, config: TrainConfig, overrides: list[str]) -> None:
    """One sentence for an override a resumed run cannot take: one that changes the recipe."""
    before, after = _flat(recorded.model_dump(mode="json")), _flat(config.model_dump(mode="json"))
    changed = [key for key in after if after[key] != before.get(key) and not key.startswith(RESUMABLE)]
    if changed:
        keys = {item: item.split("=", 1)[0].strip() for item in overrides}
        given = next((item for item, key in keys.items() if changed[0] == key or changed[0].startswith(key + ".")), changed[0])
        raise ConfigError(f"--set {given}: a resumed run keeps its recipe, so {changed[0]} cannot change; a resume may "
                          f"change training.epochs, training.early_stopping and the [runtime] settings. Start a new run "
                          f"(mvit train CONFIG) to change {changed[0]}")


def _flat(tree, prefix: str = "") -> dict:
    """Nested dicts and lists as dotted key -> value."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _read_run_config(run: Path) -> dict:
    """A run folder's config.json, as written."""
    config_path = run / "config.json"
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; give --resume the run's folder")
    if not config_path.is_file():
        raise ConfigError(f"{run} is not an mvit run folder (no config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{config_path} cannot be read as JSON ({error}); it is not the config mvit wrote") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} is not the config mvit wrote (not a JSON object)")
    return raw


def provenance(model: Model, config: TrainConfig, epoch: int, best_epoch: int, weights: str,
               training_images: TrainingImages | None = None, counts: dict[str, int] | None = None) -> dict:
    """Each training run this model went through, the splits of every dataset it has seen (so
    `mvit evaluate` tests on the same images that training held out) and, with `training_images`,
    the identities of every image it trained on, over all its runs (`counts`: this run's, per dataset)."""
    earlier = model.provenance
    splits = {d.name: {"seed": d.split_seed, "fold": d.fold, "folds": d.folds, "fractions": d.fractions}
              for d in config.datasets}
    run = {"config": config.recipe(), "epoch": epoch + 1, "best_epoch": best_epoch + 1,
           "weights": weights,  # trained, or their exponential moving average
           "backbone": model.backbone.config.model_dump()}  # what was trained, whatever the config named
    if counts is not None:
        run["training_images"] = dict(counts)
    return {
        "epoch": epoch + 1,
        "training": [*earlier.get("training", []), run],
        "splits": {**earlier.get("splits", {}), **splits},
        **({"training_images": training_images} if training_images is not None else {}),
    }


def training_images(model: Model, paths_by_dataset: dict[str, list[Path]]) -> tuple[TrainingImages, dict[str, int]]:
    """The identities of every image `model` will have trained on after this run: the run's own
    (`paths_by_dataset`: each dataset's training images) and those its init model records; and this
    run's count per dataset. An init model trained without a record makes the result incomplete."""
    own = TrainingImages.of([path for paths in paths_by_dataset.values() for path in paths])
    earlier = recorded_training_images(model.provenance)
    if earlier is None and model.provenance.get("training"):  # an mvit model file from before the record
        own = TrainingImages(own.content, own.isic, complete=False)
    counts = {dataset: len(set(paths)) for dataset, paths in paths_by_dataset.items()}
    return own.union(earlier), counts
