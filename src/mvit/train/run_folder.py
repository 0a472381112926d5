"""The run folder and its files: config.json, metrics.jsonl, last/best model files (with their
provenance), curves.png, and state.pt, which lets `--resume` continue exactly where a run stopped."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from mvit.errors import ConfigError
from mvit.infer import model_file
from mvit.infer.model import Model
from mvit.train.config import TrainConfig, validate_config

STATE_FILE = "state.pt"


class RunFolder:
    """The files of one run, under `path` (only rank 0 writes them)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.last, self.best = self.path / "last.safetensors", self.path / "best.safetensors"

    def start(self, config: TrainConfig) -> None:
        """A new run: refuses a folder that holds one, writes config.json and an empty metrics.jsonl."""
        if (self.path / STATE_FILE).exists():
            raise ConfigError(f"{self.path} already holds a run; resume it with `mvit train --resume {self.path}` or choose another output")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(config.model_dump_json(indent=2))
        self.metrics.write_text("")

    def append(self, record: dict) -> None:
        with open(self.metrics, "a") as file:
            file.write(json.dumps(record) + "\n")

    def history(self, before_epoch: int, *, rewrite: bool) -> list[dict]:
        """The records of the epochs before `before_epoch`; `rewrite`: drop the later ones from metrics.jsonl."""
        lines = self.metrics.read_text().splitlines()
        # an epoch that finished its metrics but not its state is run again
        history = [json.loads(line) for line in lines if line.strip() and json.loads(line)["epoch"] < before_epoch]
        if rewrite:
            self.metrics.write_text("".join(json.dumps(h) + "\n" for h in history))
        return history

    def plot(self, history: list[dict], best_metric: str) -> None:
        from mvit.plots import plot_training_curves

        plot_training_curves(history, self.path / "curves.png", best_metric)

    def save_state(self, state: dict) -> None:
        """Written aside, then renamed: an interrupted write leaves the previous state whole."""
        partial = self.path / f".{STATE_FILE}.partial"
        torch.save(state, partial)
        os.replace(partial, self.path / STATE_FILE)

    def load_state(self, device: torch.device) -> dict:
        path = self.path / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{self.path} holds no training state to resume (no {STATE_FILE})")
        return torch.load(path, map_location=device, weights_only=True)  # our own file: tensors and numbers


def load_run_config(run: Path) -> TrainConfig:
    """The config a run folder was started with."""
    config_path = Path(run) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run} is not an mvit run folder (no config.json)")
    return validate_config(json.loads(config_path.read_text()), source=str(config_path))


def save_model(model: Model, path: Path, heads: dict, provenance: dict) -> None:
    """The model file, each head carrying its validation metrics (`heads`: name -> {"valid": {...}})."""
    for name, head in heads.items():
        model.update_head(name, metrics={f"valid_{k}": v for k, v in head["valid"].items()
                                         if isinstance(v, (int, float)) and math.isfinite(v)})
    model_file.save(model, path, provenance=provenance)


def provenance(model: Model, config: TrainConfig, epoch: int, best_epoch: int, weights: str) -> dict:
    """Each training run this model went through, and the splits of every dataset it has seen
    (so `mvit evaluate` tests on the same images that training held out)."""
    earlier = model.provenance
    splits = {d.name: {"seed": d.split_seed, "fold": d.fold, "folds": d.folds, "fractions": d.fractions}
              for d in config.datasets}
    run = {"config": config.model_dump(mode="json"), "epoch": epoch + 1, "best_epoch": best_epoch + 1,
           "weights": weights,  # trained, or their exponential moving average
           "backbone": model.backbone.config.model_dump()}  # what was trained, whatever the config named
    return {
        "epoch": epoch + 1,
        "training": [*earlier.get("training", []), run],
        "splits": {**earlier.get("splits", {}), **splits},
    }
