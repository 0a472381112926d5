"""Does unlabelled colour transfer bring another clinic's images closer for the bundled heads?

The question behind `mvit adapt --site NAME IMAGES...` without labels: map a clinic's CIELAB
colour statistics onto the training images' (Reinhard et al. 2001: per channel, the site's pixel
mean and spread replaced by HAM10000's), then run the heads as they are. Measured on PH2 (all 150
images, melanoma against the rest, ROC AUC) and at home (the HAM10000 test split, whose statistics
are HAM10000's own, so the transfer is close to the identity there: the check is that it stays so).

    python bench/colour_transfer.py [--root ../shared/data] [--reference 400]

Prints base and transferred AUC per head and dataset, and ends with
`ratio: <transferred / base AUC of ham10000-mel on PH2>`: above 1 means the transfer helps there.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED_DATA  # noqa: E402

import mvit  # noqa: E402
from mvit.data.images import load_image  # noqa: E402
from mvit.evaluate.evaluation_set import split_settings  # noqa: E402
from mvit.datasets import splits  # noqa: E402

HEADS = ("ham10000-mel", "dermmel")
WHITE = np.array([0.95047, 1.0, 1.08883])
TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ TO_XYZ.T / WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> (..., 3) sRGB in [0, 1] (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * WHITE
    linear = np.clip(xyz @ np.linalg.inv(TO_XYZ).T, 0, 1)
    return np.clip(np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055), 0, 1)


def pixel_statistics(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (3,) of the CIELAB pixels of small copies of the images."""
    pixels = []
    for path in paths:
        image = load_image(path).convert("RGB")
        image.thumbnail((96, 96))
        pixels.append(to_lab(np.asarray(image, dtype=np.float64) / 255).reshape(-1, 3))
    every = np.concatenate(pixels)
    return every.mean(axis=0), every.std(axis=0)


def transferred(path: Path, source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray]) -> Image.Image:
    lab = to_lab(np.asarray(load_image(path).convert("RGB"), dtype=np.float64) / 255)
    lab = (lab - source[0]) / source[1] * target[1] + target[0]
    return Image.fromarray((to_rgb(lab) * 255).round().astype(np.uint8))


def aucs(model, images, melanoma: np.ndarray) -> dict[str, float]:
    found = {}
    for head in HEADS:
        predictions = model.predict(images, head=head, batch_size=64)
        found[head] = roc_auc_score(melanoma, [p.probabilities["melanoma"] for p in predictions])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED_DATA)
    parser.add_argument("--model", default=None)
    parser.add_argument("--reference", type=int, default=400, help="HAM10000 training images whose colour is the target")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = mvit.load(args.model)
    ham = splits.split_dataset("ham10000", args.root / "ham10000", **split_settings(model.provenance, "ham10000"))
    target = pixel_statistics([s.path for s in random.Random(0).sample(ham["train"], args.reference)])
    sets = {
        "PH2, all": [s for samples in splits.split_dataset("ph2", args.root / "ph2", **split_settings(model.provenance, "ph2")).values()
                     for s in samples],
        "HAM10000 test": ham["test"],
    }
    print(f"target (HAM10000 training pixels): L* {target[0][0]:.1f} a* {target[0][1]:.1f} b* {target[0][2]:.1f}")
    ratio = None
    for name, samples in sets.items():
        paths = [s.path for s in samples]
        source = pixel_statistics(paths)  # the site's own statistics: unlabelled, all its images
        melanoma = np.array([s.label in ("melanoma", "mel") for s in samples])
        base = aucs(model, paths, melanoma)
        moved = aucs(model, [transferred(p, source, target) for p in paths], melanoma)
        print(f"{name}: source L* {source[0][0]:.1f} a* {source[0][1]:.1f} b* {source[0][2]:.1f}")
        for head in HEADS:
            print(f"  {head:<13} base {base[head]:.3f}  colour-transferred {moved[head]:.3f}  ({moved[head] - base[head]:+.3f})")
        if name == "PH2, all":
            ratio = moved["ham10000-mel"] / base["ham10000-mel"]
    print(f"ratio: {ratio:.4f}")


if __name__ == "__main__":
    main()
