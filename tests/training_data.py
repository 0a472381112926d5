"""Dataset folders whose images carry their class, so a tiny model can learn them in seconds, and
the configs of such a tiny model's training run.

Each image is noise with a central disc whose colour is set by the class; the real layouts come
from `datasets_factory`, and every image there is repainted.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image, ImageDraw

from datasets_factory import make_dermmel, make_ph2, stable_seed

if TYPE_CHECKING:
    from mvit.train.config import TrainConfig

COLOURS = [(200, 40, 40), (40, 160, 220), (60, 200, 60), (220, 200, 40), (160, 60, 200), (240, 140, 20), (30, 30, 30)]


def paint(path: Path, class_index: int, size: int = 40, format: str = "JPEG") -> None:
    rng = random.Random(stable_seed(path))
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).point(lambda v: v // 2 + 64)
    draw = ImageDraw.Draw(image)
    radius = rng.randint(size // 5, size // 3)
    cx, cy = size // 2 + rng.randint(-3, 3), size // 2 + rng.randint(-3, 3)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[class_index])
    image.save(path, format, **({"quality": 92} if format == "JPEG" else {}))


def make_learnable_dermmel(parent: Path, per_class_train: int = 24, per_class_eval: int = 8) -> Path:
    counts = {
        "train_sep": {"Melanoma": per_class_train, "NotMelanoma": per_class_train},
        "valid": {"Melanoma": per_class_eval, "NotMelanoma": per_class_eval},
        "test": {"Melanoma": per_class_eval, "NotMelanoma": per_class_eval},
    }
    make_dermmel(parent, counts, augmented=2)
    for path in (parent / "DermMel").rglob("*.jp*g"):
        paint(path, 0 if path.parent.name == "Melanoma" else 1)
    return parent


def make_learnable_ph2(parent: Path, per_class: int = 10) -> Path:
    make_ph2(parent, {"0": per_class, "1": per_class, "2": per_class})
    table = (parent / "PH2Dataset" / "PH2_dataset.txt").read_text()
    for line in table.splitlines():
        if line.startswith("|| IMD"):
            cells = [cell.strip() for cell in line.split("||")]
            name, diagnosis = cells[1], int(cells[3])
            image = parent / "PH2Dataset" / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
            paint(image, diagnosis, format="BMP")
    return parent


# ---- tiny training configs: a 2-block, 32-wide DeiT on 32-pixel images, trained on the CPU

TINY_SETTINGS = {
    "backbone": {"name": "deit_tiny_patch16_224", "init": "random", "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2},
    "preprocessing": {"image_size": 32, "crop_fraction": 1.0},
    "training": {"epochs": 1, "batch_size": 8},
    "runtime": {"workers": 0, "device": "cpu"},
}

# what in-process training tests add: no drop path, fast constant learning rates, every block
# trained, no early stop
IN_PROCESS = {
    "backbone": {"drop_path": 0.0},
    "optimizer": {"head_lr": 3e-3, "backbone_lr": 3e-3, "layer_decay": 1.0, "warmup_epochs": 0},
    "unfreeze": {"mode": "all"},
    "training": {"early_stopping": None},
}


def merged(settings: dict, *layers: dict) -> dict:
    """A copy of `settings` with each layer's sections merged in, in order: a dict into the table of
    its name, any other value in that name's place."""
    result = copy.deepcopy(settings)
    for layer in layers:
        for name, values in layer.items():
            result[name] = {**result.get(name, {}), **values} if isinstance(values, dict) else values
    return result


def tiny_settings(root, output="run", **sections) -> dict:
    """The raw config of a tiny run on the DermMel folder at `root`, with `sections` merged in."""
    return merged({"output": str(output), "datasets": [{"name": "dermmel", "root": str(root)}], **TINY_SETTINGS}, sections)


def tiny_run_config(root, output, *layers: dict) -> TrainConfig:
    """The validated config of a tiny in-process run: `tiny_settings`, `IN_PROCESS`, then `layers`."""
    from mvit.train.config import validate_config

    return validate_config(merged(tiny_settings(root, output), IN_PROCESS, *layers))


def to_toml(settings: dict) -> str:
    """TOML of strings, numbers, booleans, lists of those, tables and arrays of tables; a None is
    left out (TOML has no null)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    def tables(v) -> bool:
        return isinstance(v, list) and bool(v) and isinstance(v[0], dict)

    def keys(table: dict) -> list[str]:
        return [f"{k} = {value(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict) and not tables(v)]

    lines = keys(settings)
    for name, v in settings.items():
        if isinstance(v, dict):
            lines += ["", f"[{name}]", *keys(v)]
        elif tables(v):
            for item in v:
                lines += ["", f"[[{name}]]", *keys(item)]
    return "\n".join(lines) + "\n"


def write_tiny_config(path: Path, root, *, output="run", **sections) -> Path:
    """Write the TOML config of a tiny run on the DermMel folder at `root` (see `tiny_settings`)."""
    path.write_text(to_toml(tiny_settings(root, output, **sections)))
    return path


def interrupted_run(config: TrainConfig, stop_epoch: int, monkeypatch) -> Path:
    """Train `config` until epoch `stop_epoch` (0-based) starts, as a Ctrl-C would stop it."""
    from mvit.train import trainer as training

    real_epoch = training.Trainer._train_epoch

    def stop(self, epoch, *args):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *args)

    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "_train_epoch", stop)
        with pytest.raises(KeyboardInterrupt):
            training.train(config)
    return Path(config.output)
