"""A labels file: a CSV of `image,label[,group]` rows, image paths relative to the file.

The form most people have their labelled images in, read in one place: `mvit adapt --labels`
reads it, and so can any plugin (it returns plain `Sample`s). A header row is required (column
names are what tell `image` from `label`); `group` (a lesion or patient id, kept on one side of
every split) defaults to the image's path relative to the file, so a dataset split by it splits the
same wherever its folder is moved. Every mistake is one sentence naming the file and the row.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mvit.errors import DatasetError
from mvit.registry.image_paths import is_image
from mvit.registry.specs import Sample
from mvit.registry.words import count

COLUMNS = ("image", "label")  # required; "group" is optional


def read_labels_file(path: Path | str) -> list[Sample]:
    """The rows of a labels file as `Sample`s whose images exist (path resolved against the file's folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"no labels file at {path}; give a CSV with the columns image,label (paths relative to the CSV)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the labels file {path} as UTF-8 text ({error})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise DatasetError(f"the labels file {path} is empty; it needs a header row image,label and one row per image")
    header = [name.strip().lower() for name in rows[0]]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise DatasetError(f"the labels file {path} has no {' or '.join(missing)} column (its header: {','.join(rows[0])}); "
                           f"its first row must name the columns image,label[,group]")
    where = {name: header.index(name) for name in (*COLUMNS, "group") if name in header}
    samples, absent = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(where.values()):
            raise DatasetError(f"row {number} of {path} has {count(len(row), 'column')}, the header {len(header)}")
        image, label = row[where["image"]].strip(), row[where["label"]].strip()
        if not image or not label:
            raise DatasetError(f"row {number} of {path} has an empty {'image' if not image else 'label'}")
        file = (path.parent / image).resolve() if not Path(image).is_absolute() else Path(image)
        if not file.is_file():
            absent.append(image)
            continue
        if not is_image(file):
            raise DatasetError(f"row {number} of {path} names {image}, which is not an image file (JPEG, PNG, BMP or TIFF)")
        group = row[where["group"]].strip() if "group" in where and row[where["group"]].strip() else own_group(file, path.parent)
        samples.append(Sample(path=file, label=label, group=group))
    if absent:
        raise DatasetError(f"{count(len(absent), 'image')} listed in {path} {'is' if len(absent) == 1 else 'are'} missing "
                           f"(the first: {absent[0]}); paths are relative to the labels file's folder")
    if not samples:
        raise DatasetError(f"the labels file {path} lists no images")
    return samples


def own_group(image: Path, root: Path) -> str:
    """The group of an image with no lesion id: its own path relative to the dataset's root (a
    folder, or a labels file's folder), however the root is spelled and wherever it is moved."""
    return Path(os.path.relpath(Path(image).resolve(), Path(root).resolve())).as_posix()
