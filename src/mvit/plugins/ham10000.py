"""HAM10000: seven diagnoses of pigmented lesions, several images per lesion, no official split.

    HAM10000_metadata.csv   lesion_id,image_id,dx,dx_type,age,sex,localization
    HAM10000_images_part_1/ISIC_*.jpg and HAM10000_images_part_2/ISIC_*.jpg (Kaggle),
    or all images in one folder: HAM10000_images/, images/, or next to the CSV

mvit splits it by lesion_id, so no lesion is in two splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mvit.registry import DatasetError, DatasetSpec, HeadSpec, Sample, hookimpl, is_image

METADATA = "HAM10000_metadata.csv"
LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# what each dx means in mvit's diagnosis vocabulary (Tschandl et al. 2018 define the seven)
DIAGNOSES = {
    "akiec": "actinic_keratosis",  # actinic keratoses and intraepithelial carcinoma / Bowen's disease
    "bcc": "basal_cell_carcinoma",
    "bkl": "benign_keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "nevus",  # melanocytic nevi, common and atypical alike
    "vasc": "vascular_lesion",
}
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
PART_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
SINGLE_FOLDERS = ("HAM10000_images", "images")
LAYOUT = f"{METADATA} with the images in {PART_FOLDERS[0]}/ and {PART_FOLDERS[1]}/ (or one images folder)"


def image_dirs(root: Path) -> list[Path]:
    """Where the images are: the two Kaggle part folders, else one images folder, else the root."""
    parts = [root / name for name in PART_FOLDERS if (root / name).is_dir()]
    if parts:
        return parts
    return [next((root / name for name in SINGLE_FOLDERS if (root / name).is_dir()), root)]


def check_layout(root: Path) -> None:
    if not (root / METADATA).is_file():
        raise DatasetError(f"{root} has no {METADATA}; the dataset folder must hold {LAYOUT}")


def load(root: Path) -> list[Sample]:
    check_layout(root)
    dirs = image_dirs(root)
    found = {path.stem: path for folder in dirs for path in folder.iterdir() if path.is_file() and is_image(path)}
    csv_path = root / METADATA
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{csv_path} lacks the column(s) {', '.join(missing)} (found {', '.join(reader.fieldnames or [])}); "
                f"it needs {', '.join(REQUIRED_COLUMNS)}"
            )
        samples = []
        for row in reader:
            line = reader.line_num
            image_id, dx = (row["image_id"] or "").strip(), (row["dx"] or "").strip()
            if not image_id:
                raise DatasetError(f"{csv_path} line {line} has no image_id; fill it in or remove the row")
            if dx not in LABELS:
                raise DatasetError(
                    f"{csv_path} line {line}: dx {dx!r} is not one of {', '.join(LABELS)}; fix or remove the row"
                )
            samples.append(
                Sample(
                    # a row without its image keeps its expected path, so `mvit data check` can name it
                    path=found.get(image_id, dirs[0] / f"{image_id}.jpg"),
                    label=dx,
                    group=(row["lesion_id"] or "").strip() or image_id,
                    meta={key: value for key, value in row.items() if key not in ("dx", None)},
                )
            )
    return samples


def find_images(root: Path) -> list[Path]:
    return sorted(path for folder in image_dirs(root) for path in folder.iterdir() if path.is_file() and is_image(path))


CITATION = (
    "Tschandl P, Rosendahl C, Kittler H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. Sci Data 5, 180161 (2018). doi:10.1038/sdata.2018.161"
)


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="ham10000",
            title="HAM10000: Human Against Machine with 10000 training images",
            citation=CITATION,
            license="CC BY-NC 4.0",
            homepage="https://doi.org/10.7910/DVN/DBW86T",
            labels=LABELS,
            diagnoses=DIAGNOSES,
            layout=LAYOUT,
            load=load,
            check_layout=check_layout,
            find_images=find_images,
        )
    )


@hookimpl
def register_heads(register):
    register(
        HeadSpec(
            name="ham10000",
            dataset="ham10000",
            classes=LABELS,
            description="Seven HAM10000 diagnoses: actinic keratosis/Bowen's (akiec), basal cell carcinoma (bcc), "
            "benign keratosis (bkl), dermatofibroma (df), melanoma (mel), nevus (nv), vascular (vasc).",
        )
    )
    register(
        HeadSpec(
            name="ham10000-mel",
            dataset="ham10000",
            classes=("melanoma", "not_melanoma"),
            label_map={label: "melanoma" if label == "mel" else "not_melanoma" for label in LABELS},
            positive="melanoma",
            description="Melanoma or not, trained on HAM10000.",
        )
    )
