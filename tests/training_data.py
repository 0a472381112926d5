"""Dataset folders whose images carry their class, so a tiny model can learn them in seconds.

Each image is noise with a central disc whose colour is set by the class; the real layouts come
from `datasets_factory`, and every image there is repainted.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from datasets_factory import make_dermmel, make_ph2

COLOURS = [(200, 40, 40), (40, 160, 220), (60, 200, 60), (220, 200, 40), (160, 60, 200), (240, 140, 20), (30, 30, 30)]


def paint(path: Path, class_index: int, size: int = 40, format: str = "JPEG") -> None:
    rng = random.Random(str(path))
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
