"""The trainer: one backbone, each dataset's batches through its own heads, gradual unfreezing.

The recipe, as a command: heads first on a frozen backbone, then one parameter group
unfrozen at a time from the output side back to the embeddings; class-balanced batches; several
datasets interleaved so no head is starved. Each epoch writes metrics, the last model and (when it
improved) the best model; a training state makes `--resume` continue exactly where it stopped.
Under torchrun the work is shared with DistributedDataParallel and rank 0 alone writes.

This module is the loop; the parts live beside it: `tasks` (what is trained on), `model_setup`
(the starting model), `optim` (optimiser, schedule, unfreezing), `batches` (each step's inputs),
`averaging` (EMA), `epoch_metrics`, `run_folder` (files and state), `calibration` (end of run) and
`distributed` (torchrun).

Over 300 lines on purpose: the run from its checks to its last save (the epoch loop, validation,
what each epoch records, resume state and the end-of-run calibration) reads top to bottom here;
every part that can stand alone already lives in the modules above.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvit.data.dataset import BadImages
from mvit.data.features import FeatureCache, fingerprint
from mvit.data.mixing import IGNORE, Mix, mix_images, mixing_active, soft_targets
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, TrainingDiverged
from mvit.core import model_file
from mvit.core.training_images import recorded_training_images
from mvit.runtime.precision import autocast, autocast_dtype, resolve_device
from mvit.runtime.progress import progress_bar
from mvit.train.averaging import averaged_weights, make_ema
from mvit.train.batches import SplitFeatures, decoding_workers, epoch_steps, decoded_batches, training_batches
from mvit.train import closed_form
from mvit.train.final_calibration import calibrate_heads, run_gate
from mvit.train.config import BUNDLED, TrainConfig, saves_half
from mvit.runtime.distributed import environment_local_rank, environment_rank
from mvit.runtime.distributed import Processes
from mvit.train.ddp import step_module
from mvit.train.epoch_metrics import HeadStats, epoch_line, epoch_record, selection_key
from mvit.train.model_setup import build_model
from mvit.train.optim import apply_unfreezing, make_optimizer, make_schedule, unfreeze_order, unfrozen_groups
from mvit.train.tensorboard_log import TensorBoardLog
from mvit.train.run_folder import STATE_FILE, RunFolder, open_run, provenance, training_images
from mvit.train.tasks import TRAIN, VALID, Task, build_tasks, check_validation


def train(config: TrainConfig, *, resume: bool = False, console=None) -> Path:
    """Train as `config` says; returns the best model file (calibrated on the validation split)."""
    return _run_and_release(Trainer(config, console=console, resume=resume))


def resume(run: Path, overrides: list[str] = (), *, console=None) -> Path:
    """Continue the run in folder `run` where it stopped: `run` itself, wherever it now is (never
    the output its config.json recorded). `overrides` may extend `training.epochs`, change
    `training.early_stopping` or the [runtime] settings; a change of the recipe is refused."""
    return _run_and_release(Trainer(open_run(run, overrides), console=console, resume=True))


def _run_and_release(trainer: Trainer) -> Path:
    """The run, then its folder free for a resume or another run, however the run ended. A clean
    run leaves the process group first (`Processes.close`), once the last step is taken and DDP's
    wrapper, which holds the group, is gone."""
    try:
        with trainer.processes:
            return trainer.run()
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
        trainer.folder.release()


class Trainer:
    def __init__(self, config: TrainConfig, *, console=None, resume: bool = False):
        from rich.console import Console

        self.config = config
        self.console = console or Console(stderr=True)
        self.folder = RunFolder(config.output, half=saves_half(config))
        self.device = resolve_device(config.runtime.device, environment_local_rank())
        self.processes = Processes.from_environment(self.device.type)
        self.dtype = autocast_dtype(config.runtime.precision, self.device)
        if self.device.type == "cuda":  # float32 leftovers outside autocast may use TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.tasks = build_tasks(config, self.say)
        check_validation(self.tasks)  # before the first epoch, not after the last
        if resume and self.processes.main:
            self.folder.check_writable()
        # what the config says of its init model was said when the run started
        self.model = build_model(config, self.tasks, (lambda _: None) if resume else self.warn).to(self.device)
        self.closed_form = closed_form.applies(self.model, config)  # heads fitted in one step, not by epochs
        self._check_init_leaks()
        # every model file of the run records the images trained on (hashed once: leakage exclusion
        # in build_tasks has already read each file, and content_hash remembers)
        self.trained_on, self.trained_counts = training_images(
            self.model, {task.dataset: task.paths(TRAIN) for task in self.tasks})
        self.order = unfreeze_order(self.model, config)
        self.optimizer = make_optimizer(self.model, config)
        self.ema = make_ema(self.model, config.training.ema_decay)
        steps_per_epoch = len(epoch_steps(self.tasks, config, 0, self.processes))
        self.schedule = make_schedule(self.optimizer, config, steps_per_epoch)
        self.bad_images = BadImages(config.runtime.bad_images)
        self.cache = FeatureCache(config.runtime.feature_cache or self.folder.path / "features.h5", warn=self.warn,
                                  bad_images=self.bad_images)
        self.features = SplitFeatures(self.cache, self.model, config.preprocessing, self.device, self.dtype, self.processes,
                                      workers=self._workers)
        self.history: list[dict] = []
        self.start_epoch, self.best_score, self.best_epoch, self.bad_epochs = 0, -math.inf, -1, 0
        self.best_loss = math.inf  # the best epoch's validation loss: breaks a tie of scores
        if resume and self.processes.main:
            self.folder.lock()  # held until the run ends: a second run into this folder is refused
        try:
            if resume:
                self._load_state()
            elif self.processes.main:
                self.folder.start(config)  # takes the folder's lock as well
            if self.processes.main:
                self.cache.prepare()
            self.processes.barrier()
            self.tensorboard = (TensorBoardLog(self.folder.path, self.start_epoch)
                                if config.logging.tensorboard and self.processes.main else None)
        except BaseException:
            self.folder.release()
            raise

    def say(self, message: str) -> None:
        if environment_rank() == 0:
            self.console.print(message, highlight=False, markup=False)  # paths are not markup

    def warn(self, message: str) -> None:
        if environment_rank() == 0:
            self.console.print(f"warning: {message}", highlight=False, markup=False)

    def _check_init_leaks(self) -> None:
        """A warning per dataset split whose evaluation images the init model trained on: the run's
        validation (model selection, calibration) and test scores there would overstate the model."""
        earlier = recorded_training_images(self.model.provenance)
        init = "the bundled model" if self.config.backbone.init == BUNDLED else f"the init model {self.config.backbone.init}"
        if earlier is None:
            if self.model.provenance.get("training"):
                self.warn(f"{init} does not record its training images, so whether this run's "
                          f"validation and test images were among them cannot be checked")
            return
        for task in self.tasks:
            for split, samples in task.splits.items():
                if split == task.roles[TRAIN] or not samples:
                    continue
                found = earlier.matches(sample.path for sample in samples)
                if found:
                    self.warn(f"{len(found)} of the {len(samples)} images of the {split} split of dataset {task.dataset} "
                              f"were training images of {init} (same bytes or ISIC id), so scores "
                              f"on that split overstate the model")

    # ---- the whole run

    def run(self) -> Path:
        """Train; returns the best model file (calibrated on the validation split)."""
        if self._finished():
            return self.folder.best
        if not self.closed_form:
            self._run_epochs()
        elif self.start_epoch == 0:  # (a resumed closed-form run has nothing left but calibration)
            self._fit_in_closed_form()
        self.processes.barrier()
        if self.processes.main:
            self._calibrate_and_save()
            self.say(f"best model (epoch {self.best_epoch + 1}): {self.folder.best}")
        return self.folder.best

    def _run_epochs(self) -> None:
        t = self.config.training
        previous_unfrozen, step = None, None
        with progress_bar(self.console, unit="batches", disable=not self.processes.main) as progress:
            for epoch in range(self.start_epoch, t.epochs):
                torch.manual_seed(t.seed * 100_003 + epoch)  # dropout and augmentation: the same after a resume
                started = time.perf_counter()
                unfrozen = unfrozen_groups(epoch, self.order, self.config)
                apply_unfreezing(self.model, unfrozen)
                if unfrozen != previous_unfrozen:
                    step = step_module(self.model, self.processes, self.device)
                    self.features.clear()  # kept in memory only while the backbone stays frozen
                    previous_unfrozen = unfrozen
                train = self._train_epoch(epoch, unfrozen, step, progress)
                stop = None
                if self.processes.main:
                    valid, _ = self._validate(not unfrozen, progress)
                    ema_valid = None
                    if self.ema is not None:
                        with averaged_weights(self.model, self.ema):
                            ema_valid, _ = self._validate(not unfrozen, progress)
                    record = self._record(epoch, unfrozen, train, valid, ema_valid, time.perf_counter() - started)
                    stop = self._after_epoch(epoch, record)
                stop = self.processes.share(stop)
                if stop:
                    self.say(f"early stopping: no improvement for {t.early_stopping} epochs")
                    break

    def _fit_in_closed_form(self) -> None:
        """Every head fitted at once on the frozen backbone's cached features (`closed_form`), recorded
        as the run's one epoch; the features it fitted on join the model's reference bank."""
        started = time.perf_counter()
        apply_unfreezing(self.model, [])
        key = fingerprint(self.model.backbone, self.config.preprocessing)
        fitted = closed_form.fit_heads(self.tasks, lambda task, role: self.features.get(task, role, all_ranks=True),
                                       borrow_from={d.name: d.borrow_from for d in self.config.datasets}, fingerprint=key, say=self.say)
        for name, head in fitted.heads.items():
            closed_form.load_into(self.model, name, head)
            self.model.update_head(name, l2_strength=head.strength)
        kept = self.model.reference
        self.model.reference = fitted.reference if kept is None or kept.info.fingerprint != key else kept.merged(fitted.reference)
        if not self.processes.main:
            return
        with progress_bar(self.console, unit="batches") as progress:
            valid, _ = self._validate(True, progress)
        train = {name: self._bank_summary(name) for task in self.tasks for name in task.heads}
        record = self._record(0, [], train, valid, None, time.perf_counter() - started)
        record["closed_form"] = {name: {"l2_strength": head.strength, "valid_loss": head.held_out_loss}
                                 for name, head in fitted.heads.items()}
        self._after_epoch(0, record, epochs=1)

    def _bank_summary(self, head: str) -> dict:
        """A head's loss and metrics on the training images it was fitted on."""
        features, targets = self.model.reference.rows(head)
        with torch.no_grad():
            logits = self.model.head_logits(features.to(self.device), head)[head].float().cpu()
        stats = HeadStats()
        stats.add(F.cross_entropy(logits, targets), logits, targets)
        return stats.summary(self.model.heads[head])

    # ---- one epoch

    def _train_epoch(self, epoch: int, unfrozen: list[str], step_module: nn.Module, progress) -> dict:
        """This process's steps of `epoch`; returns each head's training loss and metrics."""
        c = self.config
        from_features = not unfrozen and not c.augmentation.enabled  # a frozen backbone on unaugmented images: cached features
        steps = epoch_steps(self.tasks, c, epoch, self.processes)
        features = self.features if from_features else None
        batches = training_batches(self.tasks, steps, c, self.device, workers=self._workers, features=features,
                                   bad_images=self.bad_images)
        mixing = not from_features and mixing_active(c.augmentation.mixing, epoch, c.training.epochs)
        stats = {name: HeadStats() for task in self.tasks for name in task.heads}
        bar = progress.add_task(f"epoch {epoch + 1} train", total=len(steps))
        for step, (task, inputs, targets) in enumerate(batches):
            inputs, mix = mix_images(inputs, c.augmentation.mixing) if mixing else (inputs, Mix.none(len(targets), self.device))
            with autocast(self.device, self.dtype):
                logits = step_module(inputs, task.heads, from_features)  # head -> (B, K)
            loss = inputs.new_zeros((), dtype=torch.float32)
            for h, name in enumerate(task.heads):
                classes = len(self.model.heads[name].classes)
                soft, keep = soft_targets(targets[:, h], classes, mix, c.training.label_smoothing)  # (b, K), (B,)
                if keep.any():  # a batch where a head has no labelled sample adds nothing for it
                    head_loss = F.cross_entropy(logits[name][keep].float(), soft)
                    loss = loss + head_loss
                    # training metrics against each image's own class (the larger share of a mixed image)
                    stats[name].add(head_loss, logits[name][keep].float(), targets[keep, h])
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; "
                    f"the last good model is {self.folder.last}; lower the learning rates and resume or restart"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.optimizer.grad_clip:
                nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], c.optimizer.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            progress.advance(bar)
        progress.remove_task(bar)
        return {name: s.summary(self.model.heads[name]) for name, s in stats.items()}

    @torch.no_grad()
    def _validate(self, use_cache: bool, progress) -> tuple[dict, dict]:
        """Validation loss and metrics per head, and each head's (logits (N, K), targets (N,)).

        `use_cache`: the backbone is frozen, so its features can come from the feature cache.
        """
        self.model.eval()
        results, valid_logits = {}, {}
        for task in self.tasks:
            if use_cache:
                features = self.features.get(task, VALID, all_ranks=False)
                decoded = torch.isfinite(features).all(dim=1)  # False: skipped as unreadable
                logits = self.model.head_logits(features[decoded].to(self.device), task.heads)
            else:
                logits, decoded = self._logits(task, VALID, progress)
            for h, name in enumerate(task.heads):
                targets = task.labels(VALID)[decoded, h]
                keep = targets != IGNORE
                head_logits = logits[name].float().cpu()[keep]
                valid_logits[name] = (head_logits, targets[keep])
                stats = HeadStats()
                stats.add(F.cross_entropy(head_logits, targets[keep]), head_logits, targets[keep])
                results[name] = stats.summary(self.model.heads[name])
        return results, valid_logits

    def _logits(self, task: Task, role: str, progress) -> tuple[dict[str, Tensor], Tensor]:
        """Each head's logits (n, K) on the images of the split in `role`, decoded and run through the
        whole model, and which of the split's N images they are (N,) (all but those skipped as unreadable)."""
        paths = task.paths(role)
        size = self.config.training.batch_size * 2
        batches = [list(range(i, min(i + size, len(paths)))) for i in range(0, len(paths), size)]
        bar = progress.add_task(f"{task.dataset} {task.roles[role]}", total=len(batches))
        out: dict[str, list[Tensor]] = {name: [torch.empty(0, len(self.model.heads[name].classes))] for name in task.heads}
        decoded = torch.zeros(len(paths), dtype=torch.bool)
        images = decoded_batches(paths, eval_transform(self.config.preprocessing), batches, workers=self._workers(len(paths)),
                               device=self.device, bad_images=self.bad_images)
        for batch in images:
            if batch.images is not None:
                with autocast(self.device, self.dtype):
                    logits = self.model(batch.images.to(self.device), task.heads)
                for name in task.heads:
                    out[name].append(logits[name].float().cpu())
                decoded[batch.positions] = True
            progress.advance(bar)
        progress.remove_task(bar)
        return {name: torch.cat(parts) for name, parts in out.items()}, decoded

    def _workers(self, count: int) -> int:
        return decoding_workers(self.config, count, self.device, self.processes.world)

    # ---- after each epoch (rank 0)

    def _record(self, epoch: int, unfrozen: list[str], train: dict, valid: dict, ema_valid: Optional[dict], seconds: float) -> dict:
        lr = {g["group"]: g["lr"] for g in self.optimizer.param_groups}
        record = epoch_record(epoch, unfrozen, lr, train, valid, ema_valid, seconds, self.config.training.best_metric)
        if self.bad_images.skipped:
            record["skipped_images"] = len(self.bad_images.skipped)
        return record

    def _after_epoch(self, epoch: int, record: dict, epochs: Optional[int] = None) -> bool:
        """Write metrics, models, curves and state (rank 0); returns whether to stop early."""
        self.history.append(record)
        self.folder.append(record)
        self._save_model(self.folder.last, epoch, record["heads"])
        # the averaged weights are kept when they validate better than the trained ones
        use_ema = "ema" in record and selection_key(record["ema"]) > selection_key(record)
        key = selection_key(record["ema"] if use_ema else record)
        improved = key > (self.best_score, -self.best_loss)
        if improved:
            (self.best_score, self.best_loss), self.best_epoch, self.bad_epochs = (key[0], -key[1]), epoch, 0
            if use_ema:
                with averaged_weights(self.model, self.ema):
                    self._save_model(self.folder.best, epoch, record["ema"]["heads"], "exponential moving average")
            else:
                self._save_model(self.folder.best, epoch, record["heads"])
        else:
            self.bad_epochs += 1
        self.folder.plot(self.history, self.config.training.best_metric)
        if self.tensorboard is not None:
            self.tensorboard.epoch(record)
        self.folder.save_state(self._state(epoch))
        self.say(epoch_line(record, epochs or self.config.training.epochs, improved, use_ema))
        if self.bad_images.skipped:
            self.warn(self.bad_images.summary())
        patience = self.config.training.early_stopping
        return patience is not None and self.bad_epochs >= patience

    def _save_model(self, path: Path, epoch: int, heads: dict, weights: str = "trained") -> None:
        """A model file before calibration: the trained heads carry no operating point (`calibrated` False)."""
        self.folder.save_model(self.model, path, heads, self._provenance(epoch, weights))

    def _provenance(self, epoch: int, weights: str) -> dict:
        return provenance(self.model, self.config, epoch, self.best_epoch, weights, self.trained_on, self.trained_counts)

    # ---- training state, for --resume

    def _finished(self) -> bool:
        """Whether a resumed run has nothing left to do (said so): every epoch trained, or stopped
        early, and its best model calibrated. A run stopped during calibration calibrates again."""
        if self.start_epoch == 0:
            return False
        patience = self.config.training.early_stopping
        stopped_early = patience is not None and self.bad_epochs >= patience
        if not (self.closed_form or stopped_early or self.start_epoch >= self.config.training.epochs):
            return False
        if not self.folder.best.is_file():
            return False
        best = model_file.read_metadata(self.folder.best)
        if not all(best.heads[name].calibrated for task in self.tasks for name in task.heads):
            return False
        how = (f"stopped early after {self.start_epoch} epochs ({patience} without improvement)" if stopped_early and not self.closed_form
               else "fitted its heads in closed form" if self.closed_form else f"trained all its {self.start_epoch} epochs")
        more = "" if self.closed_form else (f"; to train longer, resume with --epochs {self.start_epoch + 5}"
                                            + (" and --set training.early_stopping=false" if stopped_early else ""))
        self.say(f"{self.folder.path} is finished: it {how}, best epoch {self.best_epoch + 1} ({self.folder.best}){more}")
        return True

    def _state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "best_score": self.best_score,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def _load_state(self) -> None:
        state = self.folder.load_state(self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"{self.folder.path / STATE_FILE} was saved without weight averaging; resume without training.ema_decay")
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = state["epoch"] + 1
        self.best_score, self.best_epoch, self.bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        self.best_loss = state.get("best_loss", math.inf)  # a state saved before ties were broken by loss
        epochs = self.config.training.epochs
        if epochs < self.start_epoch and not self.closed_form:
            raise ConfigError(f"{self.folder.path} has trained {self.start_epoch} epochs already; "
                              f"resume with --epochs {self.start_epoch + 1} or more to train longer")
        self.folder.check_best(self.best_epoch)  # now, not after the remaining epochs
        self.history = self.folder.history(self.start_epoch, rewrite=self.processes.main)

    # ---- end of run

    def _calibrate_and_save(self) -> None:
        """Temperature, (binary heads) decision threshold and OOD gate of the best model, on validation data."""
        if not self.folder.best.is_file():
            return
        best = model_file.load(self.folder.best, device=self.device)
        self.model.load_state_dict(best.state_dict())
        for name, info in best.heads.items():
            self.model.update_head(name, metrics=dict(info.metrics))
        from rich.progress import Progress

        _, valid_logits = self._validate(self.config.unfreeze.mode == "none", Progress(disable=True))
        calibrate_heads(self.model, valid_logits, self.config.calibration, datasets=self._head_datasets())
        if self.tensorboard is not None:
            self.tensorboard.confusion_matrices(self.model, valid_logits, self.best_epoch + 1)
        self.model.ood_gate = run_gate(self.model, self.tasks, self.config, cache=self.cache.path, workers=self._workers,
                                       say=self.say, leave_out=set(self.bad_images.skipped))
        weights = best.provenance["training"][-1].get("weights", "trained")  # a best file from before averaging existed
        self.folder.save_calibrated(self.model, provenance=self._provenance(self.best_epoch, weights))

    def _head_datasets(self) -> dict[str, str]:
        """Head -> "dataset D (split S)", for calibration's messages."""
        return {name: f"the {task.roles[VALID]} split of dataset {task.dataset}" for task in self.tasks for name in task.heads}
