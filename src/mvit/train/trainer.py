"""The trainer: one backbone, each dataset's batches through its own heads, gradual unfreezing.

The seed project's recipe, as a command: heads first on a frozen backbone, then one parameter group
unfrozen at a time from the output side back to the embeddings; class-balanced batches; several
datasets interleaved so no head is starved. Each epoch writes metrics, the last model and (when it
improved) the best model; a training state makes `--resume` continue exactly where it stopped.
Under torchrun the work is shared with DistributedDataParallel and rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvit.infer import model_file
from mvit.train.config import TrainConfig, validate_config
from mvit.data.dataset import ImageBatch, image_loader, loader_workers, raise_errors
from mvit.evaluate.report import choose_threshold, classification_metrics, fit_temperature
from mvit.data.features import FeatureCache
from mvit.data.mixing import IGNORE, Mix, mix_images, mixing_active, soft_targets
from mvit.infer.model import Model
from mvit.nn.heads import HeadInfo
from mvit.nn.precision import autocast, autocast_dtype, resolve_device
from mvit.data.sampling import balanced_batches, batches_per_dataset, interleave, shuffled_batches
from mvit.data.transforms import eval_transform, train_transform
from mvit.nn.vit import VisionTransformer, named_config
from mvit.nn.weights import create_backbone
from mvit.errors import ConfigError, MvitError, TrainingDiverged
from mvit.registry import leakage, manager, splits
from mvit.registry.records import class_indices
from mvit.registry.specs import Sample

TRAIN, VALID = "train", "valid"
STATE_FILE = "state.pt"


# ---- what is trained on -------------------------------------------------------------------------


@dataclass
class Task:
    """One dataset of the run: its splits and, for each of its heads, every sample's class."""

    dataset: str
    heads: list[str]
    splits: dict[str, list[Sample]]
    targets: dict[str, Tensor]  # split -> (N, len(heads)) class indices, IGNORE where a head leaves a sample out

    def paths(self, split: str) -> list[Path]:
        return [sample.path for sample in self.splits[split]]


def build_tasks(config: TrainConfig, say: Callable[[str], None]) -> list[Task]:
    """Load and split every dataset, and keep images shared between datasets out of training."""
    per_dataset, heads = {}, {}
    for entry in config.datasets:
        spec = manager.get_dataset(entry.name)
        fold = None if spec.official_splits else entry.fold
        per_dataset[entry.name] = splits.split_dataset(
            entry.name, entry.root, seed=entry.split_seed, fold=fold, folds=entry.folds, fractions=entry.fractions
        )
        offered = [head.name for head in manager.registry().heads_of(entry.name)]
        for name in entry.heads:
            if manager.get_head(name).dataset != entry.name:
                raise ConfigError(f"head {name!r} belongs to dataset {manager.get_head(name).dataset!r}, not {entry.name!r}")
        heads[entry.name] = entry.heads or offered
    cleaned, report = leakage.exclude_shared(per_dataset, training=TRAIN)
    if report.excluded:
        say(f"kept {len(report.excluded)} training images out: the same image is in an evaluation split")
    tasks = []
    for entry in config.datasets:
        specs = [manager.get_head(name) for name in heads[entry.name]]
        targets, kept = {}, {}
        for split, samples in cleaned[entry.name].items():
            per_head = [class_indices(spec, samples) for spec in specs]  # (heads, N), None where left out
            rows = [[IGNORE if index is None else index for index in row] for row in zip(*per_head)]  # (N, heads)
            used = [i for i, row in enumerate(rows) if any(t != IGNORE for t in row)]
            kept[split] = [samples[i] for i in used]
            targets[split] = torch.tensor([rows[i] for i in used], dtype=torch.long).reshape(len(used), len(specs))
        for split in (TRAIN, VALID):
            if not kept.get(split):
                raise ConfigError(f"dataset {entry.name} has no images in its {split} split; check its root and split settings")
        tasks.append(Task(entry.name, heads[entry.name], kept, targets))
    return tasks


# ---- the model --------------------------------------------------------------------------------


def build_model(config: TrainConfig, tasks: list[Task], warn: Callable[[str], None]) -> Model:
    """Backbone from random, timm's DeiT, a DeiT checkpoint or an earlier mvit model; one head per name."""
    torch.manual_seed(config.training.seed)  # the same initial heads (and random backbone) on every rank and run
    init, b = config.backbone.init, config.backbone
    overrides = {**b.overrides(), "image_size": config.preprocessing.image_size}
    previous: Optional[Model] = None
    if init == "random":
        warn("the backbone starts from RANDOM weights: expect far lower accuracy than from pretrained DeiT weights")
        backbone = create_backbone(b.name, None, **overrides)
    elif init != "timm" and _is_mvit_model(Path(init)):
        previous = model_file.load(init)
        backbone = _continued_backbone(previous.backbone, b, init, warn)
        if backbone.config.image_size != config.preprocessing.image_size:
            raise ConfigError(f"{init} was trained at {backbone.config.image_size} px; set preprocessing.image_size to it")
        changed = {k: v for k, v in config.preprocessing.model_dump().items() if v != previous.preprocessing.model_dump()[k]}
        if changed:
            warn(f"the preprocessing differs from that of {init} ({', '.join(f'{k} = {v}' for k, v in changed.items())}); "
                 f"its backbone{' (frozen here)' if config.unfreeze.mode == 'none' else ''} learned from differently prepared images")
    else:
        backbone = create_backbone(b.name, init, **overrides)
    model = Model(backbone, config.preprocessing)
    if previous is not None:
        model.provenance = dict(previous.provenance)
        if config.unfreeze.mode == "none":  # a frozen backbone leaves the gate's features unchanged
            model.ood_gate = previous.ood_gate
    trained_here = {name for task in tasks for name in task.heads}
    for name, info in (previous.heads.items() if previous else []):
        # A frozen backbone leaves the earlier heads valid: keep them, so a model gains heads one
        # dataset at a time. A backbone that will change would leave them stale: drop them.
        if name in trained_here or config.unfreeze.mode == "none":
            if name not in trained_here or info.classes == manager.get_head(name).classes:
                model.add_head(info)
                model.classifiers[name].load_state_dict(previous.classifiers[name].state_dict())
        else:
            warn(f"head {name!r} of {init} is dropped: the backbone is fine-tuned, which would leave it stale")
    for name in sorted(trained_here - set(model.heads)):
        model.add_head(HeadInfo.from_spec(manager.get_head(name)))
    return model


def _continued_backbone(backbone: VisionTransformer, b, init: str, warn: Callable[[str], None]) -> VisionTransformer:
    """An mvit model's backbone, with the regularisation the config sets explicitly (dropout,
    attention_dropout, drop_path); the architecture is the model's, and a config that sets another
    one is refused rather than silently ignored."""
    explicit = b.model_fields_set
    shape = {k: getattr(b, k) for k in ("patch_size", "width", "depth", "num_heads", "image_size") if k in explicit}
    differing = {k: v for k, v in shape.items() if v is not None and v != getattr(backbone.config, k)}
    if differing:
        have = ", ".join(f"{k} = {getattr(backbone.config, k)}" for k in differing)
        raise ConfigError(f"backbone.init {init} has {have}; a config cannot change its architecture, so remove "
                          f"backbone.{', backbone.'.join(differing)} (or start from another init)")
    if "name" in explicit:
        warn(f"backbone.name {b.name!r} is not used: the architecture is that of {init} (recorded in the model file)")
    regularisation = {k: getattr(b, k) for k in ("dropout", "attention_dropout", "drop_path") if k in explicit}
    if not regularisation or all(getattr(backbone.config, k) == v for k, v in regularisation.items()):
        return backbone
    continued = VisionTransformer(named_config(backbone.config, **regularisation))
    continued.load_state_dict(backbone.state_dict())  # same shapes: regularisation has no weights
    return continued


def _is_mvit_model(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        model_file.read_metadata(path)
        return True
    except MvitError:
        return False


def unfreeze_order(model: Model, config: TrainConfig) -> list[str]:
    groups = list(model.backbone.parameter_groups())
    default = ["final_norm"] + [g for g in reversed(groups) if g.startswith("block.")] + ["position", "patch_embed"]
    order = config.unfreeze.order or default
    unknown = [g for g in order if g not in groups]
    if unknown:
        raise ConfigError(f"unfreeze.order names unknown groups {unknown}; the groups are {', '.join(groups)}")
    return order


def unfrozen_groups(epoch: int, order: list[str], config: TrainConfig) -> list[str]:
    """Backbone groups trained in `epoch` (0-based)."""
    u = config.unfreeze
    if u.mode == "all":
        return list(order)
    if u.mode == "none" or epoch < u.frozen_epochs:
        return []
    steps = 1 + (epoch - u.frozen_epochs) // u.every
    return order[: min(len(order), steps * u.groups_per_step)]


def apply_unfreezing(model: Model, unfrozen: list[str]) -> None:
    """Gradients only for unfrozen groups (frozen ones get no gradient and so no optimizer state),
    and frozen blocks in eval mode, so dropout and drop-path leave frozen features unchanged."""
    model.train()
    for name, params in model.backbone.parameter_groups().items():
        for param in params:
            param.requires_grad_(name in unfrozen)
    for index, block in enumerate(model.backbone.blocks):
        if f"block.{index}" not in unfrozen:
            block.eval()
    if "position" not in unfrozen:
        model.backbone.embedding_dropout.eval()


def make_optimizer(model: Model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with layer-wise learning rates: heads at head_lr, the last block at backbone_lr, each
    earlier block layer_decay times less. Norms, biases and tokens get no weight decay."""
    o, depth = config.optimizer, model.backbone.config.depth
    distance = {"final_norm": 0, "position": depth, "patch_embed": depth}
    distance.update({f"block.{i}": depth - 1 - i for i in range(depth)})
    param_groups = []
    for name, params in model.parameter_groups().items():
        lr = o.head_lr if name.startswith("head.") else o.backbone_lr * o.layer_decay ** distance[name]
        decay = [p for p in params if p.ndim >= 2 and not _is_token(model, p)]
        no_decay = [p for p in params if p.ndim < 2 or _is_token(model, p)]
        for subset, weight_decay in ((decay, o.weight_decay), (no_decay, 0.0)):
            if subset:
                param_groups.append({"params": subset, "lr": lr, "weight_decay": weight_decay, "group": name})
    return torch.optim.AdamW(param_groups, betas=o.betas)


def _is_token(model: Model, param: nn.Parameter) -> bool:
    return param is model.backbone.class_token or param is model.backbone.position_embedding


def make_schedule(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    o = config.optimizer
    total = config.training.epochs * steps_per_epoch
    warmup = round(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return o.min_lr_fraction + (1 - o.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- several processes --------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_type: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

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
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _Step(nn.Module):
    """What DistributedDataParallel wraps: images or cached features -> the task's head logits."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, heads: list[str], from_features: bool) -> dict[str, Tensor]:
        features = inputs if from_features else self.model.backbone(inputs)  # (B, D)
        return self.model.head_logits(features, heads)


# ---- the run ------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig, *, console=None, resume: bool = False):
        from rich.console import Console

        self.config = config
        self.console = console or Console(stderr=True)
        self.out = Path(config.output)
        device_name = config.training.device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local_rank)
        self.processes = Processes.from_environment(device.type)
        self.device = device
        self.dtype = autocast_dtype(config.training.precision, device)
        if device.type == "cuda":  # float32 leftovers outside autocast may use TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.tasks = build_tasks(config, self.say)
        self.model = build_model(config, self.tasks, self.warn).to(device)
        self.order = unfreeze_order(self.model, config)
        self.optimizer = make_optimizer(self.model, config)
        self.ema = _ema(self.model, config.training.ema_decay)
        self.steps_per_epoch = len(self._plan(0))
        self.schedule = make_schedule(self.optimizer, config, self.steps_per_epoch)
        self.cache = FeatureCache(config.training.feature_cache or self.out / "features.h5", warn=self.warn)
        self.history: list[dict] = []
        self._features: dict[tuple[str, str], Tensor] = {}  # (dataset, split) -> cached features (N, D)
        self.start_epoch, self.best_score, self.best_epoch, self.bad_epochs = 0, -math.inf, -1, 0
        if resume:
            self._load_state()
        elif self.processes.main:
            self._start_run_folder()
        self.processes.barrier()

    # ---- messages

    def say(self, message: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            self.console.print(f"[bold yellow]warning:[/] {message}", highlight=False)

    # ---- run folder and state

    def _start_run_folder(self) -> None:
        if (self.out / STATE_FILE).exists():
            raise ConfigError(f"{self.out} already holds a run; resume it with `mvit train --resume {self.out}` or choose another output")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(self.config.model_dump_json(indent=2))
        (self.out / "metrics.jsonl").write_text("")

    def _save_state(self, epoch: int) -> None:
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }
        partial = self.out / f".{STATE_FILE}.partial"
        torch.save(state, partial)
        os.replace(partial, self.out / STATE_FILE)

    def _load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{self.out} holds no training state to resume (no {STATE_FILE})")
        state = torch.load(path, map_location=self.device, weights_only=True)  # our own file: tensors and numbers
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"{path} was saved without weight averaging; resume without training.ema_decay")
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = state["epoch"] + 1
        self.best_score, self.best_epoch, self.bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        # an epoch that finished its metrics but not its state is run again
        self.history = [json.loads(line) for line in lines if line.strip() and json.loads(line)["epoch"] < self.start_epoch]
        if self.processes.main:
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))

    # ---- batches

    def _plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """This process's steps of `epoch`: (task index, sample indices), the same after a resume."""
        t = self.config.training
        generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        sizes = [len(task.splits[TRAIN]) for task in self.tasks]
        counts = batches_per_dataset(sizes, t.batch_size, t.dataset_weighting)
        batches = [
            balanced_batches(task.targets[TRAIN][:, 0].tolist(), t.batch_size, count, generator)
            if t.balanced
            else shuffled_batches(len(task.splits[TRAIN]), t.batch_size, count, generator)
            for task, count in zip(self.tasks, counts)
        ]
        taken = [0] * len(self.tasks)
        steps = []
        for i in interleave(counts):
            steps.append((i, batches[i][taken[i]]))
            taken[i] += 1
        world = self.processes.world
        steps = steps[: len(steps) // world * world]  # every rank takes the same number of steps
        return steps[self.processes.rank :: world]

    def _workers(self, count: int) -> int:
        return decoding_workers(self.config, count, self.device, self.processes.world)

    def _loader(self, paths: list[Path], transform: Callable, batches: list[list[int]]) -> Iterator[ImageBatch]:
        """Decoded batches of `paths` as `batches` lists them; an unreadable image stops the run with its sentence."""
        count = sum(len(batch) for batch in batches)
        loader = image_loader(paths, transform, batch_sampler=batches, workers=self._workers(count), device=self.device)
        return raise_errors(loader)

    def _cached_features(self, task: Task, split: str, *, all_ranks: bool) -> Tensor:
        """Backbone features (N, D) of a split from the cache; `all_ranks`: every rank is here, so
        they share the extraction and wait for each other."""
        if (task.dataset, split) in self._features:  # the backbone has not changed since
            return self._features[task.dataset, split]
        paths = [s.path for s in task.splits[split]]
        options = dict(device=self.device, dtype=self.dtype, workers=self._workers(len(paths)))
        if all_ranks and self.processes.world > 1:
            self.cache.extract(self.model.backbone, self.config.preprocessing, paths,
                               shard=(self.processes.rank, self.processes.world), **options)
            self.processes.barrier()
        features = self.cache.load(self.model.backbone, self.config.preprocessing, paths, **options)
        self._features[task.dataset, split] = features
        return features

    # ---- one epoch

    def _train_epoch(self, epoch: int, unfrozen: list[str], step_module: nn.Module, progress) -> dict:
        use_cache = not unfrozen and not self.config.augmentation.enabled
        steps = self._plan(epoch)
        if use_cache:
            sources = [self._cached_features(task, TRAIN, all_ranks=True) for task in self.tasks]
        else:
            transform = train_transform(self.config.preprocessing, self.config.augmentation)
            loaders = [
                self._loader(task.paths(TRAIN), transform, [batch for i, batch in steps if i == k])
                for k, task in enumerate(self.tasks)
            ]
        stats = {name: _HeadStats() for task in self.tasks for name in task.heads}
        label_smoothing = self.config.training.label_smoothing
        mixing = self.config.augmentation.mixing
        mixing_on = not use_cache and mixing_active(mixing, epoch, self.config.training.epochs)
        bar = progress.add_task(f"epoch {epoch + 1} train", total=len(steps))
        for step, (k, batch) in enumerate(steps):
            task = self.tasks[k]
            if use_cache:
                inputs, targets = sources[k][batch], task.targets[TRAIN][batch]
            else:
                decoded = next(loaders[k])
                inputs, targets = decoded.images, task.targets[TRAIN][decoded.positions]
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            inputs, mix = mix_images(inputs, mixing) if mixing_on else (inputs, Mix.none(len(targets), self.device))
            with autocast(self.device, self.dtype):
                logits = step_module(inputs, task.heads, use_cache)
            loss = inputs.new_zeros((), dtype=torch.float32)
            for h, name in enumerate(task.heads):
                classes = len(self.model.heads[name].classes)
                soft, keep = soft_targets(targets[:, h], classes, mix, label_smoothing)  # (b, K), (B,)
                if keep.any():  # a batch where a head has no labelled sample adds nothing for it
                    head_loss = F.cross_entropy(logits[name][keep].float(), soft)
                    loss = loss + head_loss
                    # training metrics against each image's own class (the larger share of a mixed image)
                    stats[name].add(head_loss, logits[name][keep].float(), targets[keep, h])
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; "
                    f"the last good model is {self.out / 'last.safetensors'}; lower the learning rates and resume or restart"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.optimizer.grad_clip:
                nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.optimizer.grad_clip)
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
                features = self._cached_features(task, VALID, all_ranks=False).to(self.device)
                logits = self.model.head_logits(features, task.heads)
            else:
                logits = self._logits(task, VALID, progress)
            for h, name in enumerate(task.heads):
                targets = task.targets[VALID][:, h]
                keep = targets != IGNORE
                head_logits = logits[name].float().cpu()[keep]
                valid_logits[name] = (head_logits, targets[keep])
                stats = _HeadStats()
                stats.add(F.cross_entropy(head_logits, targets[keep]), head_logits, targets[keep])
                results[name] = stats.summary(self.model.heads[name])
        return results, valid_logits

    def _logits(self, task: Task, split: str, progress) -> dict[str, Tensor]:
        paths = task.paths(split)
        size = self.config.training.batch_size * 2
        batches = [list(range(i, min(i + size, len(paths)))) for i in range(0, len(paths), size)]
        bar = progress.add_task(f"{task.dataset} {split}", total=len(batches))
        out: dict[str, list[Tensor]] = {name: [] for name in task.heads}
        for batch in self._loader(paths, eval_transform(self.config.preprocessing), batches):
            with autocast(self.device, self.dtype):
                logits = self.model(batch.images.to(self.device), task.heads)
            for name in task.heads:
                out[name].append(logits[name].float().cpu())
            progress.advance(bar)
        progress.remove_task(bar)
        return {name: torch.cat(parts) for name, parts in out.items()}

    # ---- the whole run

    def run(self) -> Path:
        """Train; returns the best model file (calibrated on the validation split)."""
        from mvit.progress import progress_bar

        t = self.config.training
        previous_unfrozen = None
        step_module: nn.Module = _Step(self.model)
        with progress_bar(self.console, unit="batches", disable=not self.processes.main) as progress:
            for epoch in range(self.start_epoch, t.epochs):
                torch.manual_seed(t.seed * 100_003 + epoch)  # dropout and augmentation: the same after a resume
                started = time.perf_counter()
                unfrozen = unfrozen_groups(epoch, self.order, self.config)
                apply_unfreezing(self.model, unfrozen)
                if unfrozen != previous_unfrozen:
                    step_module = self._wrap(unfrozen)
                    self._features.clear()  # kept in memory only while the backbone stays frozen
                    previous_unfrozen = unfrozen
                train = self._train_epoch(epoch, unfrozen, step_module, progress)
                stop = None
                if self.processes.main:
                    valid, _ = self._validate(not unfrozen, progress)
                    ema_valid = None
                    if self.ema is not None:
                        with self._ema_weights():
                            ema_valid, _ = self._validate(not unfrozen, progress)
                    record = self._record(epoch, unfrozen, train, valid, ema_valid, time.perf_counter() - started)
                    stop = self._after_epoch(epoch, record)
                stop = self.processes.share(stop)
                if stop:
                    self.say(f"early stopping: no improvement for {t.early_stopping} epochs")
                    break
        self.processes.barrier()
        best = self.out / "best.safetensors"
        if self.processes.main:
            self._calibrate_and_save()
            self.say(f"best model (epoch {self.best_epoch + 1}): {best}")
        return best

    def _wrap(self, unfrozen: list[str]) -> nn.Module:
        step = _Step(self.model)
        if self.processes.world == 1:
            return step
        from torch.nn.parallel import DistributedDataParallel

        # rebuilt at each unfreezing step: DDP only synchronises parameters that required grad when wrapped
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)

    def _record(self, epoch: int, unfrozen: list[str], train: dict, valid: dict, ema_valid: Optional[dict], seconds: float) -> dict:
        heads = {name: {"train": train[name], "valid": valid.get(name, {})} for name in train}
        record = {
            "epoch": epoch,
            "unfrozen": len(unfrozen),
            "unfrozen_groups": unfrozen,
            "lr": {g["group"]: g["lr"] for g in self.optimizer.param_groups},
            "heads": heads,
            "score": self._score(valid),
            "seconds": round(seconds, 2),
        }
        if ema_valid is not None:  # the averaged weights, validated on the same images
            record["ema"] = {"heads": {name: {"valid": v} for name, v in ema_valid.items()}, "score": self._score(ema_valid)}
        return record

    def _score(self, valid: dict) -> float:
        """The model-selection score: `best_metric` averaged over heads (higher is better)."""
        metric = self.config.training.best_metric
        scores = [(-v["loss"] if metric == "loss" else v.get(metric, float("nan"))) for v in valid.values()]
        finite = [s for s in scores if s is not None and math.isfinite(s)]
        return sum(finite) / len(finite) if finite else float("nan")

    @contextmanager
    def _ema_weights(self):
        """The averaged weights in `self.model` for the duration, then its own weights back."""
        own = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.model.load_state_dict(own)

    def _after_epoch(self, epoch: int, record: dict) -> bool:
        """Write metrics, models, curves and state (rank 0); returns whether to stop early."""
        from mvit.plots import plot_training_curves

        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        self._save_model(self.out / "last.safetensors", epoch, record["heads"])
        # the averaged weights are kept when they validate better than the trained ones
        use_ema = "ema" in record and record["ema"]["score"] > record["score"]
        score = record["ema"]["score"] if use_ema else record["score"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            if use_ema:
                with self._ema_weights():
                    self._save_model(self.out / "best.safetensors", epoch, record["ema"]["heads"], averaged=True)
            else:
                self._save_model(self.out / "best.safetensors", epoch, record["heads"])
        else:
            self.bad_epochs += 1
        plot_training_curves(self.history, self.out / "curves.png", self.config.training.best_metric)
        self._save_state(epoch)
        summary = "  ".join(
            f"{name}: loss {h['train']['loss']:.3f}/{h['valid']['loss']:.3f} "
            f"bal.acc {h['valid'].get('balanced_accuracy', float('nan')):.3f}"
            for name, h in record["heads"].items()
        )
        ema = f"  EMA score {record['ema']['score']:.3f}" if "ema" in record else ""
        self.say(f"epoch {epoch + 1}/{self.config.training.epochs} [{record['unfrozen']} groups unfrozen] "
                 f"{summary}  score {record['score']:.3f}{ema}"
                 f"{('  *best (EMA)*' if use_ema else '  *best*') if improved else ''}  ({record['seconds']:.0f} s)")
        patience = self.config.training.early_stopping
        return patience is not None and self.bad_epochs >= patience

    def _save_model(self, path: Path, epoch: int, heads: dict, averaged: bool = False) -> None:
        for name, head in heads.items():
            self.model.update_head(name, metrics={f"valid_{k}": v for k, v in head["valid"].items()
                                                  if isinstance(v, (int, float)) and math.isfinite(v)})
        model_file.save(self.model, path, provenance=self._provenance(epoch, "exponential moving average" if averaged else "trained"))

    def _provenance(self, epoch: int, weights: str) -> dict:
        """Each training run this model went through, and the splits of every dataset it has seen
        (so `mvit evaluate` tests on the same images that training held out)."""
        earlier = self.model.provenance
        splits = {d.name: {"seed": d.split_seed, "fold": d.fold, "folds": d.folds, "fractions": d.fractions}
                  for d in self.config.datasets}
        run = {"config": self.config.model_dump(mode="json"), "epoch": epoch + 1, "best_epoch": self.best_epoch + 1,
               "weights": weights,  # trained, or their exponential moving average
               "backbone": self.model.backbone.config.model_dump()}  # what was trained, whatever the config named
        return {
            "epoch": epoch + 1,
            "training": [*earlier.get("training", []), run],
            "splits": {**earlier.get("splits", {}), **splits},
        }

    def _calibrate_and_save(self) -> None:
        """Temperature and (binary heads) the decision threshold of the best model, on validation data."""
        best_path = self.out / "best.safetensors"
        if not best_path.is_file():
            return
        best = model_file.load(best_path, device=self.device)
        self.model.load_state_dict(best.state_dict())
        for name, info in best.heads.items():
            self.model.update_head(name, metrics=dict(info.metrics))
        from rich.progress import Progress

        _, valid_logits = self._validate(self.config.unfreeze.mode == "none", Progress(disable=True))
        c = self.config.calibration
        for name, (logits, targets) in valid_logits.items():
            info = self.model.heads[name]
            temperature = fit_temperature(logits, targets) if c.temperature else 1.0
            probabilities = torch.softmax(logits / temperature, dim=1).numpy()
            changes = {"temperature": temperature}
            if info.is_binary:
                positive = info.classes.index(info.positive)
                changes["threshold"] = choose_threshold(probabilities[:, positive], targets.numpy() == positive, c.target_sensitivity)
                changes["threshold_target"] = f"sensitivity >= {c.target_sensitivity:g} on the validation split"
            metrics = classification_metrics(probabilities, targets.numpy(), info.classes, info.positive, changes.get("threshold"))
            changes["metrics"] = {**info.metrics, **{f"valid_calibrated_{k}": v for k, v in metrics.items()
                                                     if isinstance(v, (int, float)) and math.isfinite(v)}}
            self.model.update_head(name, **changes)
        if not c.ood_gate.enabled:
            self.model.ood_gate = None
        elif self.model.ood_gate is not None:  # the init model's, kept because the backbone stayed frozen
            datasets = ", ".join(self.model.ood_gate.info.datasets) or "its training data"
            self.say(f"kept the init model's out-of-distribution gate (fitted on {datasets}); to cover this run's "
                     f"datasets too, refit it on all of them with `mvit calibrate`")
        else:
            self.model.ood_gate = self._fit_gate()
        weights = best.provenance["training"][-1].get("weights", "trained")  # a best file from before averaging existed
        model_file.save(self.model, best_path, provenance=self._provenance(self.best_epoch, weights))

    def _fit_gate(self):
        """The out-of-distribution gate of the best model: its training images' features, and a
        threshold that accepts `accept` of its validation images."""
        from mvit.evaluate.gate import fit_gate

        g = self.config.calibration.ood_gate
        paths = {split: list(dict.fromkeys(s.path for task in self.tasks for s in task.splits[split])) for split in (TRAIN, VALID)}
        gate = fit_gate(self.model, paths[TRAIN], paths[VALID], method=g.method, accept=g.accept, layer=g.layer,
                        datasets=[task.dataset for task in self.tasks], precision=self.config.training.precision,
                        workers=self._workers(len(paths[TRAIN])), cache=self.cache.path, say=self.say)
        self.say(f"out-of-distribution gate: {gate.method} on {len(paths[TRAIN])} training images of "
                 f"{', '.join(task.dataset for task in self.tasks)}, accepting {g.accept:.0%} of validation images")
        return gate


def _ema(model: Model, decay: float):
    """An exponential moving average of the model's weights (PyTorch's own), or None (decay 0)."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class _HeadStats:
    """Running loss and predictions of one head over an epoch.

    Kept on the model's device and read once in `summary`: a `.item()` or `.cpu()` per step would
    make the CPU wait for the GPU at every step."""

    def __init__(self):
        self.losses, self.probabilities, self.targets = [], [], []

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        """loss: the batch's mean loss (a 0-d tensor); logits (b, K); targets (b,)."""
        self.losses.append(loss.detach() * len(targets))
        self.probabilities.append(torch.softmax(logits.detach().float(), dim=1))
        self.targets.append(targets.detach())

    def summary(self, info: HeadInfo) -> dict:
        if not self.targets:
            return {"loss": float("nan")}
        probabilities = torch.cat(self.probabilities).cpu().numpy()  # (N, K)
        targets = torch.cat(self.targets).cpu().numpy()  # (N,)
        loss = float(torch.stack(self.losses).sum()) / len(targets)
        metrics = classification_metrics(probabilities, targets, info.classes)
        keep = ("accuracy", "balanced_accuracy", "roc_auc")
        return {"loss": loss, **{k: metrics[k] for k in keep if k in metrics}}


def train(config: TrainConfig, *, resume: bool = False, console=None) -> Path:
    return Trainer(config, console=console, resume=resume).run()


def resume(run: Path, *, console=None) -> Path:
    config_path = Path(run) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run} is not an mvit run folder (no config.json)")
    config = validate_config(json.loads(config_path.read_text()), source=str(config_path))
    return Trainer(config, console=console, resume=True).run()


def decoding_workers(config: TrainConfig, count: int, device: torch.device, processes: int) -> int:
    """The config's `workers`, or for "auto" the loader's choice for `count` images per process."""
    workers = config.training.workers
    return loader_workers(count, config.training.batch_size, device, processes) if workers == "auto" else workers


def extract(config: TrainConfig, *, console=None) -> Path:
    """Fill the feature cache for every split of the config's datasets (sharded under torchrun)."""
    from rich.console import Console

    from mvit.progress import progress_bar

    console = console or Console(stderr=True)
    device = resolve_device(config.training.device, int(os.environ.get("LOCAL_RANK", "0")))
    processes = Processes.from_environment(device.type)
    say = (lambda message: console.print(message, highlight=False)) if processes.main else (lambda message: None)
    tasks = build_tasks(config, say)
    model = build_model(config, tasks, say).to(device)
    cache = FeatureCache(config.training.feature_cache or Path(config.output) / "features.h5", warn=say)
    paths = list(dict.fromkeys(s.path for task in tasks for samples in task.splits.values() for s in samples))
    workers = decoding_workers(config, len(paths), device, processes.world)
    with progress_bar(console, disable=not processes.main) as progress:
        bar = progress.add_task("extracting features", total=len(paths))
        computed = cache.extract(model.backbone, config.preprocessing, paths, device=device,
                                 dtype=autocast_dtype(config.training.precision, device), workers=workers,
                                 shard=(processes.rank, processes.world), progress=lambda n: progress.advance(bar, n))
    processes.barrier()
    say(f"{len(paths)} images in {cache.path}; this process computed {computed}, the rest were cached")
    return cache.path
