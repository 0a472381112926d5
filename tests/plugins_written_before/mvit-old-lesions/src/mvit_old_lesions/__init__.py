"""mvit plugin for the old-lesions dataset.

Layout of the dataset folder (the --root):

    labels.csv        image,label,lesion   (lesion: optional; images of one lesion share a split)
    images/<image>    the image files named in the image column

Change LABELS, DIAGNOSES, `load` and the heads to your dataset; keep the hooks. A plugin imports
only `mvit.registry`, so `mvit plugins` lists it without importing torch.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mvit.registry import DatasetError, DatasetSpec, HeadSpec, Sample, hookimpl

NAME = "old-lesions"
LABELS_FILE = "labels.csv"
IMAGES = "images"
LAYOUT = f"{LABELS_FILE} (image,label[,lesion]) and {IMAGES}/<image>"
LABELS = ("melanoma", "nevus", "keratosis")  # every label the loader can produce
# what each label means in mvit's diagnosis vocabulary (mvit.registry.diagnoses), so heads of other
# datasets can be evaluated on this one and this dataset's heads on others
DIAGNOSES = {"melanoma": "melanoma", "nevus": "nevus", "keratosis": "benign_keratosis"}


def check_layout(root: Path) -> None:
    for name in (LABELS_FILE, IMAGES):
        if not (root / name).exists():
            raise DatasetError(f"{root} has no {name}; the dataset folder must hold {LAYOUT}")


def load(root: Path) -> list[Sample]:
    """One Sample per row of labels.csv, whether or not its image exists (mvit reports missing ones)."""
    path = root / LABELS_FILE
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in ("image", "label") if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)}; it needs image,label[,lesion]")
        samples = []
        for row in reader:
            image = row["image"].strip()
            samples.append(Sample(path=root / IMAGES / image, label=row["label"].strip(),
                                  group=(row.get("lesion") or "").strip() or image))
    return samples


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name=NAME,
            title="old-lesions",
            citation="",  # how users of the dataset must cite it
            license="",  # the dataset's license, e.g. CC BY-NC 4.0
            homepage="",
            labels=LABELS,
            diagnoses=DIAGNOSES,
            layout=LAYOUT,
            load=load,
            check_layout=check_layout,
            find_images=lambda root: sorted(path for path in (root / IMAGES).iterdir() if path.is_file()),
        )
    )


@hookimpl
def register_heads(register):
    register(HeadSpec(name=NAME, dataset=NAME, classes=LABELS, description="The old-lesions diagnoses."))
    register(
        HeadSpec(
            name=f"{NAME}-mel",
            dataset=NAME,
            classes=("melanoma", "not_melanoma"),
            label_map={"melanoma": "melanoma", "nevus": "not_melanoma", "keratosis": "not_melanoma"},
            positive="melanoma",
            description="Melanoma or not, trained on old-lesions.",
        )
    )
