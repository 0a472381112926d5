"""DermMel (Kaggle): melanoma vs not melanoma, in official split folders.

    DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}/*.jpg|*.jpeg

The Kaggle set mixes augmented copies (`AUG_*.jpeg`, flips of other images) into its folders. They
are flagged `meta["augmented"]`, which keeps them in training only: in an evaluation split they would
score a model on an image it has, in effect, already seen.
"""

from __future__ import annotations

from pathlib import Path

from mvit.registry import DatasetError, DatasetSpec, HeadSpec, Sample, hookimpl, image_files, is_image, other_than

SPLIT_FOLDERS = {"train_sep": "train", "valid": "valid", "test": "test"}  # folder -> mvit split
LABELS = ("Melanoma", "NotMelanoma")
LAYOUT = "DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}/*.jpg"


def dataset_dir(root: Path) -> Path:
    """The folder holding the split folders: `root` itself, or `root/DermMel` as Kaggle unpacks it."""
    for candidate in (root, root / "DermMel"):
        if all((candidate / folder).is_dir() for folder in SPLIT_FOLDERS):
            return candidate
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    raise DatasetError(
        f"{root} is not a DermMel folder: expected train_sep/, valid/ and test/ in it or in {root / 'DermMel'}, "
        f"found {found or 'no folders'}; the dataset folder must hold {LAYOUT}"
    )


def check_layout(root: Path) -> None:
    base = dataset_dir(root)
    for folder in SPLIT_FOLDERS:
        for child in sorted((base / folder).iterdir()):
            if child.is_dir() and child.name not in LABELS:
                raise DatasetError(
                    f"{child} is not a DermMel class folder (expected {' or '.join(LABELS)}); "
                    f"rename it or move it out of the dataset"
                )


def load(root: Path) -> list[Sample]:
    base = dataset_dir(root)
    samples = []
    for folder, split in SPLIT_FOLDERS.items():
        for label in LABELS:
            for path in _images(base / folder / label):
                augmented = path.name.startswith("AUG_")
                samples.append(
                    Sample(
                        path=path,
                        label=label,
                        # file names are ISIC ids, one image per lesion; an augmented copy is its own group
                        group=path.stem,
                        split=split,
                        meta={"augmented": augmented, "folder": folder},
                    )
                )
    return samples


def find_images(root: Path) -> list[Path]:
    return image_files(dataset_dir(root))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p)) if folder.is_dir() else []


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="dermmel",
            title="DermMel: melanoma detection (Kaggle)",
            citation="DermMel, Kaggle dataset by drscarlat, built from ISIC archive and HAM10000 images.",
            license="CC BY-NC 4.0 (from its ISIC/HAM10000 sources)",
            homepage="https://www.kaggle.com/datasets/drscarlat/melanoma",
            labels=LABELS,
            # NotMelanoma holds ISIC images of any other diagnosis (nevi, keratoses, carcinomas ...)
            diagnoses={"Melanoma": "melanoma", "NotMelanoma": other_than("melanoma")},
            layout=LAYOUT,
            official_splits=True,
            load=load,
            check_layout=check_layout,
            find_images=find_images,
        )
    )


@hookimpl
def register_heads(register):
    register(
        HeadSpec(
            name="dermmel",
            dataset="dermmel",
            classes=("melanoma", "not_melanoma"),
            label_map={"Melanoma": "melanoma", "NotMelanoma": "not_melanoma"},
            positive="melanoma",
            description="Melanoma or not, trained on DermMel.",
        )
    )
