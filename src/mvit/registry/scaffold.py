"""`mvit plugins new NAME`: a working dataset plugin package to start from.

It writes what a plugin author needs and nothing else: a pyproject with the `mvit` entry point, a
module with a loader for a simple layout (a labels CSV beside an images folder), both hooks with a
multi-class head and a melanoma head, a test that generates a tiny dataset and checks the plugin
against mvit's own checks, and a README saying what to change. The author edits the loader for
their dataset's real layout; everything else already fits the contract in docs/plugins.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from mvit.errors import ConfigError
from mvit.registry.specs import is_valid_name

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "mvit-$name"
version = "0.1.0"
description = "mvit dataset plugin: $name"
readme = "README.md"
requires-python = ">=3.11"
# a plugin uses only the contract, mvit.registry: no torch import of its own
dependencies = ["mvit"]

[project.optional-dependencies]
test = ["pytest", "pillow"]

# how mvit finds the plugin: entry-point group "mvit", plugin name -> module
[project.entry-points.mvit]
$name = "$module"

[tool.setuptools.packages.find]
where = ["src"]
"""

MODULE = '''\
"""mvit plugin for the $name dataset.

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

NAME = "$name"
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
            title="$name",
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
    register(HeadSpec(name=NAME, dataset=NAME, classes=LABELS, description="The $name diagnoses."))
    register(
        HeadSpec(
            name=f"{NAME}-mel",
            dataset=NAME,
            classes=("melanoma", "not_melanoma"),
            label_map={"melanoma": "melanoma", "nevus": "not_melanoma", "keratosis": "not_melanoma"},
            positive="melanoma",
            description="Melanoma or not, trained on $name.",
        )
    )
'''

TEST = '''\
"""The plugin against mvit's own checks, on a tiny generated dataset."""

from __future__ import annotations

import csv
import random

import pytest
from PIL import Image

import $module as plugin
from mvit.registry.check import check_dataset
from mvit.registry.loading import build_registry
from mvit.registry.manager import temporary_plugins


@pytest.fixture
def root(tmp_path):
    """A dataset folder in the plugin's layout: 12 lesions, two images each, every label present."""
    (tmp_path / plugin.IMAGES).mkdir()
    rows, rng = [], random.Random(0)
    for lesion in range(12):
        label = plugin.LABELS[lesion % len(plugin.LABELS)]
        for view in range(2):
            name = f"lesion{lesion}_{view}.png"
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (32, 32), colour).save(tmp_path / plugin.IMAGES / name)
            rows.append({"image": name, "label": label, "lesion": f"L{lesion}"})
    with (tmp_path / plugin.LABELS_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "lesion"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_the_plugin_registers_its_dataset_and_heads_without_warnings():
    registry = build_registry([plugin], entry_points=False)
    assert registry.warnings == []
    assert plugin.NAME in registry.datasets
    assert {head.name for head in registry.heads_of(plugin.NAME)} == {plugin.NAME, f"{plugin.NAME}-mel"}


def test_a_generated_dataset_passes_mvits_check(root):
    with temporary_plugins(plugin, entry_points=False):
        report = check_dataset(plugin.NAME, root)
    assert report.usable, report.errors
    assert report.images == 24


def test_a_wrong_folder_is_one_sentence(tmp_path):
    with pytest.raises(plugin.DatasetError, match="has no labels.csv"):
        plugin.check_layout(tmp_path)
'''

README = """\
# mvit-$name

A dataset plugin for mvit: the $name dataset, its diagnoses and two
classifier heads (`$name` and `$name-mel`).

    pip install -e '.[test]'     # installs the plugin: `mvit plugins` now lists it
    pytest                        # the plugin against mvit's own checks on a generated dataset
    mvit data check $name --root /path/to/dataset

To make it yours, edit `src/$module/__init__.py`:

1. `LABELS`, `DIAGNOSES`: every label your loader produces, and what it means in mvit's diagnosis
   vocabulary (`python -c "import mvit.registry.diagnoses as d; print(sorted(d.TERMS))"`).
2. `load(root)`: one `Sample(path, label, group)` per labelled image; `group` is what must not be
   split across train and test (the lesion or patient id).
3. `check_layout`, `LAYOUT`: a fast check with one sentence naming what is missing.
4. The heads: classes, and a `label_map` that names every label (map a label to None to leave it out).
5. `citation`, `license`, `homepage`: shown by `mvit plugins`.

Train heads for it on the bundled backbone with a config whose `[[datasets]]` names `$name`
(see mvit's docs/training.md, "Add your dataset's heads to the bundled model").
"""


def module_name(name: str) -> str:
    return "mvit_" + re.sub(r"[-]", "_", name)


def write_plugin(name: str, folder: Path) -> Path:
    """Write the package `mvit-NAME` into `folder` (which must not exist or be empty); returns it."""
    if not is_valid_name(name):
        raise ConfigError(
            f"{name!r} cannot name a dataset: use lower-case letters, digits, '-' and '_', starting with a letter"
        )
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder; choose another --output")
    module = module_name(name)
    values = {"name": name, "module": module}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"src/{module}/__init__.py": MODULE,
        "tests/test_plugin.py": TEST,
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values))
    return folder
