"""End-of-run calibration of the best model on the validation split: each head's temperature and
(binary heads) decision threshold, and the out-of-distribution gate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from mvit.evaluate.calibration import choose_threshold, fit_temperature
from mvit.evaluate.gate import fit_gate
from mvit.evaluate.metrics import classification_metrics
from mvit.core.model import Model
from mvit.core.gate import GateRecipe, OODGate
from mvit.runtime.options import RunOptions
from mvit.errors import ConfigError
from mvit.train.config import CalibrationConfig, TrainConfig
from mvit.train.tasks import TRAIN, VALID, Task


def calibrate_heads(model: Model, valid_logits: dict[str, tuple[Tensor, Tensor]], c: CalibrationConfig,
                    datasets: Optional[dict[str, str]] = None) -> None:
    """Each head's temperature, threshold and calibrated validation metrics, from its validation
    (logits (N, K), targets (N,)). A head whose validation images cannot calibrate it (none, or a
    binary head without both classes) is a ConfigError naming it (`datasets`: head -> where its
    validation images come from, for that sentence), never a bare ValueError."""
    for name, (logits, targets) in valid_logits.items():
        info = model.heads[name]
        where = (datasets or {}).get(name, "its validation split")
        if len(targets) == 0:
            raise ConfigError(f"head {name} has no readable images in {where}, so it cannot be calibrated; "
                              f"add labelled images to that split")
        changes = {"calibrated": True}
        try:
            temperature = fit_temperature(logits, targets) if c.temperature else 1.0
            probabilities = torch.softmax(logits / temperature, dim=1).numpy()
            changes["temperature"] = temperature
            if info.is_binary:
                positive = info.positive_index
                for cls, present in ((info.positive, targets == positive), (info.classes[1 - positive], targets != positive)):
                    if not bool(present.any()):
                        raise ValueError(f"no {cls} image among its {len(targets)} readable validation images")
                changes["threshold"] = choose_threshold(probabilities[:, positive], targets.numpy() == positive, c.target_sensitivity)
                changes["threshold_target"] = f"sensitivity >= {c.target_sensitivity:g} on the validation split"
        except ValueError as error:
            raise ConfigError(f"head {name} cannot be calibrated on {where}: {error}; give that split labelled "
                              f"images of every class (more images, another split_seed, or other split fractions), "
                              f"then resume the run") from None
        metrics = classification_metrics(probabilities, targets.numpy(), info.classes, info.positive, changes.get("threshold"))
        changes["metrics"] = {**info.metrics, **{f"valid_calibrated_{k}": v for k, v in metrics.items()
                                                 if isinstance(v, (int, float)) and math.isfinite(v)}}
        model.update_head(name, **changes)


def run_gate(model: Model, tasks: list[Task], config: TrainConfig, *, cache: Path, workers: Callable[[int], int],
             say: Callable[[str], None], leave_out: frozenset[str] | set[str] = frozenset()) -> Optional[OODGate]:
    """The gate the best model ships with: none, the init model's (kept because the backbone stayed
    frozen), or one fitted here (`workers`: decoding processes for a number of images; `leave_out`:
    the paths of images skipped as unreadable)."""
    if not config.calibration.ood_gate.enabled:
        return None
    if model.ood_gate is not None:
        fitted_on = model.ood_gate.info.datasets
        roots = {name: "DIR" for name in fitted_on} | {d.name: str(d.root) for d in config.datasets}
        pairs = " ".join(f"--dataset {name} --root {root}" for name, root in roots.items())
        best = Path(config.output) / "best.safetensors"
        say(f"kept the init model's out-of-distribution gate (fitted on {', '.join(fitted_on) or 'its training data'}); "
            f"to cover this run's datasets too, refit it on all of them (or on the ones you have): "
            f"mvit calibrate -m {best} -o {best} {pairs}")
        return model.ood_gate
    return _fit_gate(model, tasks, config, cache=cache, workers=workers, say=say, leave_out=leave_out)


def _fit_gate(model: Model, tasks: list[Task], config: TrainConfig, *, cache: Path, workers: Callable[[int], int],
              say: Callable[[str], None], leave_out=frozenset()) -> OODGate:
    """The best model's training images' features, and a threshold that accepts `accept` of its validation images."""
    g = config.calibration.ood_gate
    paths = {role: list(dict.fromkeys(s.path for task in tasks for s in task.samples(role) if str(s.path) not in leave_out))
             for role in (TRAIN, VALID)}
    gate = fit_gate(model, paths[TRAIN], paths[VALID], GateRecipe(method=g.method, accept=g.accept, layer=g.layer),
                    datasets=[task.dataset for task in tasks], cache=cache,
                    run=RunOptions(precision=config.runtime.precision, workers=workers(len(paths[TRAIN])), say=say))
    say(f"out-of-distribution gate: {gate.method} on {len(paths[TRAIN])} training images of "
        f"{', '.join(task.dataset for task in tasks)}, accepting {g.accept:.0%} of validation images")
    return gate
