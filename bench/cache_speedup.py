"""Head training from the HDF5 feature cache against recomputing the frozen backbone every epoch.

Two runs of `mvit.train.trainer.Trainer` on the same generated DermMel-layout images with the same
frozen backbone (deit_small_patch16_224 at 224 px) and the same head: one whose inputs count as
augmented (identity augmentation: full-image crops, no flips, no colour), so every epoch runs the
backbone, and one without augmentation, which reads the cached features. Prints seconds per epoch
(validation included, cached in both) and the one-off extraction, and ends with
`ratio: <recompute epoch time / cached epoch time>`.

    .venv/bin/python bench/cache_speedup.py [--images 64] [--epochs 3] [--backbone deit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's image makers

from training_data import make_learnable_dermmel  # noqa: E402

from mvit.train.config import validate_config  # noqa: E402
from mvit.train.trainer import Trainer  # noqa: E402


def run(root: Path, output: Path, backbone: str, epochs: int, augmented: bool) -> list[float]:
    augmentation = {"enabled": True, "crop_scale": [1.0, 1.0], "flips": False, "color_jitter": 0.0, "hue_jitter": 0.0}
    config = validate_config({
        "output": str(output),
        "datasets": [{"name": "dermmel", "root": str(root)}],
        "backbone": {"name": backbone, "init": "random", "drop_path": 0.0},
        "preprocessing": {"image_size": 224},
        "augmentation": augmentation if augmented else {"enabled": False},
        "unfreeze": {"mode": "none"},
        "training": {"epochs": epochs, "batch_size": 16, "early_stopping": None},
        "runtime": {"workers": 0, "device": "cpu", "feature_cache": str(output.parent / "features.h5")},
    })
    Trainer(config).run()
    return [json.loads(line)["seconds"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="training images (half per class)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="deit_small_patch16_224")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        root = make_learnable_dermmel(folder / "data", per_class_train=args.images // 2, per_class_eval=4)
        started = time.perf_counter()
        cached = run(root, folder / "cached", args.backbone, args.epochs + 1, augmented=False)
        total = time.perf_counter() - started
        recomputed = run(root, folder / "recomputed", args.backbone, args.epochs, augmented=True)
    extraction = cached[0]  # the first cached epoch extracts every feature once
    cached_epoch = statistics.median(cached[1:])
    recomputed_epoch = statistics.median(recomputed)
    print(f"{args.backbone}, {args.images} training images, frozen backbone, head trained {args.epochs} epochs")
    print(f"{'path':<34}{'s/epoch':>10}")
    print(f"{'recompute the backbone each epoch':<34}{recomputed_epoch:>10.3f}")
    print(f"{'read features from the HDF5 cache':<34}{cached_epoch:>10.3f}")
    print(f"one-off extraction (first cached epoch): {extraction:.1f} s; whole cached run {total:.1f} s")
    print(f"ratio: {recomputed_epoch / cached_epoch:.1f}")


if __name__ == "__main__":
    main()
