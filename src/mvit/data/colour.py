"""CIELAB colour statistics of images: how a clinic's images differ in colour from another's.

Dermatoscopes and clinics differ most visibly in colour (HAM10000 images average a* = 25, PH2 14):
a site profile records its images' L*, a*, b* so `mvit info` can show how far a site is from the
training images. sRGB (D65) to CIELAB by the standard formulas, on a small copy of each image.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

_SIZE = 64  # pixels on the longer side: a mean colour needs no detail
# linear sRGB -> XYZ (D65), then XYZ scaled by the D65 white point
_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) / np.array([[0.95047], [1.0], [1.08883]])


def lab(image: Image.Image) -> np.ndarray:
    """The mean L*, a*, b* (3,) of an RGB image."""
    small = image.convert("RGB").copy()
    small.thumbnail((_SIZE, _SIZE))
    rgb = np.asarray(small, dtype=np.float64).reshape(-1, 3) / 255.0  # (N, 3)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _TO_XYZ.T  # (N, 3), relative to the white point
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L, a, b = 116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])
    return np.array([L.mean(), a.mean(), b.mean()])


def lab_statistics(images: Iterable[Image.Image]) -> dict[str, list[float]]:
    """{"L": [mean, sd], "a": [...], "b": [...]} over images' mean colours."""
    values = np.stack([lab(image) for image in images])  # (n, 3)
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(3)
    return {name: [round(float(m), 2), round(float(s), 2)] for name, m, s in zip("Lab", values.mean(axis=0), spread)}
