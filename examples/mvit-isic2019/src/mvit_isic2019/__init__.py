"""mvit plugin for the ISIC 2019 challenge training set (25,331 dermoscopic images, eight diagnoses).

    ISIC_2019_Training_GroundTruth.csv   image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK  (one-hot, "1.0"/"0.0")
    ISIC_2019_Training_Metadata.csv      optional: image,age_approx,anatom_site_general,lesion_id,sex
    ISIC_2019_Training_Input/<image>.jpg

A plugin imports only the contract, `mvit.registry`: it is data and small functions, and listing it
(`mvit plugins`) must not pull in torch.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mvit.registry import DatasetError, DatasetSpec, HeadSpec, Sample, hookimpl

GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGES = "ISIC_2019_Training_Input"
DIAGNOSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
LABELS = (*DIAGNOSES, "UNK")  # UNK ("none of the others") is a column; no training image carries it
LAYOUT = f"{GROUND_TRUTH} and {IMAGES}/ISIC_*.jpg"


def check_layout(root: Path) -> None:
    for name in (GROUND_TRUTH, IMAGES):
        if not (root / name).exists():
            raise DatasetError(f"{root} has no {name}; the dataset folder must hold {LAYOUT}")


def _lesions(root: Path) -> dict[str, str]:
    """image -> lesion_id from the optional metadata CSV, so a lesion's images share a split."""
    path = root / METADATA
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return {row["image"]: row["lesion_id"] for row in csv.DictReader(handle) if row.get("lesion_id")}


def load(root: Path) -> list[Sample]:
    path = root / GROUND_TRUTH
    lesions = _lesions(root)
    samples = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("image", *DIAGNOSES) if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path} lacks the column(s) {', '.join(missing)}; it needs image and the one-hot columns "
                f"{', '.join(DIAGNOSES)}"
            )
        columns = [c for c in LABELS if c in reader.fieldnames]
        for row in reader:
            try:
                hot = [c for c in columns if float(row[c] or 0) == 1.0]
            except ValueError:
                raise DatasetError(f"{path} line {reader.line_num}: the one-hot columns must hold 0.0 or 1.0") from None
            if len(hot) != 1:
                raise DatasetError(
                    f"{path} line {reader.line_num}: image {row['image']} has {len(hot)} diagnoses set to 1.0 "
                    f"where one-hot rows have exactly one; fix the row"
                )
            image = row["image"].strip()
            samples.append(
                Sample(path=root / IMAGES / f"{image}.jpg", label=hot[0], group=lesions.get(image, image),
                       meta={"image": image})
            )
    return samples


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="isic2019",
            title="ISIC 2019 challenge training set",
            citation=(
                "Tschandl P, et al. Sci Data 5, 180161 (2018); Codella N, et al. arXiv:1710.05006 (2017); "
                "Combalia M, et al. arXiv:1908.02288 (2019)."
            ),
            license="CC BY-NC 4.0",
            homepage="https://challenge.isic-archive.com/data/#2019",
            labels=LABELS,
            layout=LAYOUT,
            load=load,
            check_layout=check_layout,
            find_images=lambda root: sorted((root / IMAGES).glob("*.jpg")),
        )
    )


@hookimpl
def register_heads(register):
    register(
        HeadSpec(
            name="isic2019",
            dataset="isic2019",
            classes=tuple(label.lower() for label in DIAGNOSES),
            label_map={**{label: label.lower() for label in DIAGNOSES}, "UNK": None},
            description="ISIC 2019 diagnoses: melanoma, nevus, basal cell carcinoma, actinic keratosis, benign "
            "keratosis, dermatofibroma, vascular lesion, squamous cell carcinoma.",
        )
    )
    register(
        HeadSpec(
            name="isic2019-mel",
            dataset="isic2019",
            classes=("melanoma", "not_melanoma"),
            label_map={**{label: "not_melanoma" for label in DIAGNOSES}, "MEL": "melanoma", "UNK": None},
            positive="melanoma",
            description="Melanoma or not, trained on ISIC 2019.",
        )
    )
