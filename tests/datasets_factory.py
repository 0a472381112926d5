"""Small dataset folders in each real layout, written with Pillow, for tests (and training tests).

Every image has its own random pixels (seeded by its name), so no two files are identical unless a
test copies one on purpose. Each `make_*` returns the folder to pass as `--root`.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path
from typing import Mapping, Optional

from PIL import Image

SIZE = (32, 24)


def stable_seed(path: Path) -> str:
    """The seed of a file's pixels: its path below pytest's numbered base folder (`pytest-N`, which
    changes from run to run), so that a test sees the same pixels on every run."""
    parts = Path(path).parts
    numbered = [i for i, part in enumerate(parts) if re.fullmatch(r"pytest-\d+", part)]
    return "/".join(parts[numbered[-1] + 1:] if numbered else parts)


def write_image(path: Path, *, seed: Optional[str] = None, size: tuple[int, int] = SIZE, format: Optional[str] = None) -> Path:
    """An RGB image of random pixels; the format follows the suffix (.jpg, .jpeg, .png, .bmp)."""
    rng = random.Random(seed or stable_seed(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    fmt = format or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
    image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def truncate(path: Path, keep: int = 200) -> Path:
    """Cut a file short, as an interrupted download leaves it: it no longer decodes."""
    path.write_bytes(path.read_bytes()[:keep])
    return path


def isic(n: int) -> str:
    return f"ISIC_{n:07d}"


# ---- DermMel -----------------------------------------------------------------------------------

DERMMEL_COUNTS = {
    "train_sep": {"Melanoma": 6, "NotMelanoma": 6},
    "valid": {"Melanoma": 3, "NotMelanoma": 3},
    "test": {"Melanoma": 3, "NotMelanoma": 3},
}


def make_dermmel(
    parent: Path, counts: Mapping[str, Mapping[str, int]] = DERMMEL_COUNTS, *, augmented: int = 2, first_id: int = 24306
) -> Path:
    """`parent/DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}/ISIC_*.jpg`, plus `augmented`
    `AUG_0_<n>.jpeg` files in train_sep/Melanoma. Returns `parent` (the plugin finds DermMel/ in it)."""
    n = first_id
    for split, classes in counts.items():
        for label, count in classes.items():
            (parent / "DermMel" / split / label).mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                write_image(parent / "DermMel" / split / label / f"{isic(n)}.jpg")
                n += 1
    for k in range(augmented):
        write_image(parent / "DermMel" / "train_sep" / "Melanoma" / f"AUG_0_{k}.jpeg")
    return parent


# ---- HAM10000 ----------------------------------------------------------------------------------

HAM_LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


def ham_rows(per_class: int = 6, images_per_lesion: int = 2, first_id: int = 24306) -> list[dict[str, str]]:
    """Metadata rows: `per_class` lesions of each dx, each photographed `images_per_lesion` times."""
    rows, n, lesion = [], first_id, 0
    for dx in HAM_LABELS:
        for _ in range(per_class):
            for _ in range(images_per_lesion):
                rows.append(
                    {"lesion_id": f"HAM_{lesion:07d}", "image_id": isic(n), "dx": dx, "dx_type": "histo",
                     "age": "50.0", "sex": "male", "localization": "back"}
                )
                n += 1
            lesion += 1
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], columns: Optional[tuple[str, ...]] = None) -> Path:
    columns = columns or tuple(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_ham10000(
    root: Path, rows: Optional[list[dict[str, str]]] = None, *, layout: str = "parts", columns: tuple[str, ...] = HAM_COLUMNS
) -> Path:
    """`root/HAM10000_metadata.csv` and the images: `layout` "parts" splits them between
    HAM10000_images_part_1/ and _part_2/ (by id, as Kaggle does), "single" puts them in HAM10000_images/."""
    rows = ham_rows() if rows is None else rows
    write_csv(root / "HAM10000_metadata.csv", rows, columns)
    ids = sorted(row["image_id"] for row in rows)
    for index, image_id in enumerate(ids):
        if layout == "parts":
            folder = "HAM10000_images_part_1" if index < len(ids) // 2 else "HAM10000_images_part_2"
        else:
            folder = "HAM10000_images"
        write_image(root / folder / f"{image_id}.jpg")
    return root


# ---- PH2 ---------------------------------------------------------------------------------------

PH2_HEADER = (
    "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | Dots/Globules | "
    "Streaks | Regression Areas | Blue-Whitish Veil ||           Colors ||"
)
PH2_LEGEND = """

Legends for Clinical Diagnosis:
 0 - Common Nevus;
 1 - Atypical Nevus;
 2 - Melanoma.

Legends for Colors:
 1 - White;
 2 - Red;
 3 - Light-Brown;
 4 - Dark-Brown;
 5 - Blue-Gray;
 6 - Black.
"""


def ph2_row(name: str, diagnosis: str, *, blank: bool = False, histology: str = "") -> str:
    if blank:  # as IMD146 in the real file: a diagnosis and nothing else
        return f"|| {name} || {'':>22} || {diagnosis:>18} || {'':>9} | {'':>15} | {'':>13} | {'':>7} | {'':>16} | {'':>17} || {'':>16} ||"
    return (
        f"|| {name} || {histology:>22} || {diagnosis:>18} || {'0':>9} | {'T':>15} | {'A':>13} | {'A':>7} | "
        f"{'A':>16} | {'A':>17} || {'3  4':>16} ||"
    )


def make_ph2(
    parent: Path, counts: Mapping[str, int] = {"0": 8, "1": 8, "2": 4}, *, blank_first: bool = True,
    rows: Optional[list[str]] = None,
) -> Path:
    """`parent/PH2Dataset/PH2_dataset.txt` (header, rows, legends) and each row's BMP in the official
    folders. The first row has blank criteria, as IMD146 does. Returns `parent`."""
    base = parent / "PH2Dataset"
    if rows is None:
        rows, n = [], 1
        for diagnosis, count in counts.items():
            for _ in range(count):
                rows.append(ph2_row(f"IMD{n:03d}", diagnosis, blank=blank_first and n == 1,
                                    histology="Melanoma" if diagnosis == "2" else ""))
                n += 1
    base.mkdir(parents=True, exist_ok=True)
    (base / "PH2_dataset.txt").write_text("\n".join([PH2_HEADER, *rows]) + PH2_LEGEND)
    for row in rows:
        name = row.split("||")[1].strip()
        folder = base / "PH2 Dataset images" / name
        write_image(folder / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        write_image(folder / f"{name}_lesion" / f"{name}_lesion.bmp")  # masks are images too, but not samples
    return parent


# ---- ISIC 2019 (the example plugin) ------------------------------------------------------------

ISIC2019_COLUMNS = ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def make_isic2019(root: Path, per_class: int = 3, *, first_id: int = 40000) -> Path:
    """`root/ISIC_2019_Training_GroundTruth.csv` (one-hot) and `root/ISIC_2019_Training_Input/*.jpg`."""
    rows, n = [], first_id
    for label in ISIC2019_COLUMNS[1:-1]:
        for _ in range(per_class):
            rows.append({"image": isic(n), **{c: "1.0" if c == label else "0.0" for c in ISIC2019_COLUMNS[1:]}})
            write_image(root / "ISIC_2019_Training_Input" / f"{isic(n)}.jpg")
            n += 1
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", rows, ISIC2019_COLUMNS)
    return root
