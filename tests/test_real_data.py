"""The real images in ../shared/data (outside the repository), with the exact counts of its README.

Skipped with a reason where the folder is absent; point MVIT_SHARED_DATA at it elsewhere.
"""

from __future__ import annotations

from collections import Counter

import pytest

from clirun import call_mvit
from conftest import SHARED_DATA
from mvit.core.training_images import content_hash
from mvit.datasets import leakage, splits
from mvit.registry import manager
from mvit.datasets.records import load_samples

DATA = SHARED_DATA

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (DATA / "README.md").is_file(), reason=f"the real-data folder {DATA} is absent"),
]

HAM = DATA / "ham10000"
DERMMEL = DATA / "dermmel"
PH2 = DATA / "ph2"


@pytest.fixture(autouse=True)
def fresh_registry():
    manager.reset()
    yield
    manager.reset()


def test_ham10000_counts_per_dx_and_part():
    samples = load_samples("ham10000", HAM)
    parts = Counter((s.label, s.path.parent.name[-6:]) for s in samples)
    expected = {
        "akiec": (86, 97), "bcc": (112, 152), "bkl": (282, 301), "df": (27, 33),
        "mel": (162, 329), "nv": (2234, 2089), "vasc": (40, 40),
    }
    for dx, (part_1, part_2) in expected.items():
        assert (parts[(dx, "part_1")], parts[(dx, "part_2")]) == (part_1, part_2), dx
    assert len(samples) == 5984
    assert len({s.group for s in samples}) == 5984  # one image per lesion in this subset


def test_ham10000_splits_by_lesion_and_class():
    result = splits.split_dataset("ham10000", HAM)
    assert sum(len(items) for items in result.values()) == 5984
    mel = {split: sum(s.label == "mel" for s in items) for split, items in result.items()}
    assert mel["train"] == 344 and sorted([mel["valid"], mel["test"]]) == [73, 74]  # 491 dealt 70/15/15


def test_dermmel_counts_per_split_and_class():
    samples = load_samples("dermmel", DERMMEL)
    assert Counter((s.split, s.label) for s in samples) == {
        ("train", "Melanoma"): 364, ("train", "NotMelanoma"): 344,
        ("valid", "Melanoma"): 74, ("valid", "NotMelanoma"): 74,
        ("test", "Melanoma"): 73, ("test", "NotMelanoma"): 73,
    }
    augmented = sorted(s.path.name for s in samples if s.meta["augmented"])
    assert augmented == sorted(f"AUG_0_{n}.jpeg" for n in range(20))
    assert all(s.split == "train" and s.label == "Melanoma" for s in samples if s.meta["augmented"])
    originals = Counter(s.split for s in samples if not s.meta["augmented"])
    assert originals == {"train": 688, "valid": 148, "test": 146}


def test_ph2_counts_and_the_blank_row():
    samples = load_samples("ph2", PH2)
    assert Counter(s.label for s in samples) == {"common_nevus": 60, "atypical_nevus": 60, "melanoma": 30}
    imd146 = next(s for s in samples if s.group == "IMD146")
    assert imd146.label == "common_nevus" and imd146.meta["Asymmetry"] is None and imd146.meta["Colors"] == []
    lentigo = [s for s in samples if s.meta["Histological Diagnosis"] == "Lentigo Maligna"]
    assert lentigo and all(s.label == "melanoma" for s in lentigo)


@pytest.mark.slow
@pytest.mark.parametrize("name, root", [("dermmel", DERMMEL), ("ham10000", HAM), ("ph2", PH2)])
def test_mvit_data_check_passes(capsys, monkeypatch, name, root):
    result = call_mvit(capsys, monkeypatch, "data", "check", name, "--root", str(root))
    assert result.code == 0, result.stdout + result.stderr
    assert "usable" in result.stdout and "warning" not in result.stdout


def test_every_dermmel_original_is_a_ham10000_image_and_leaks_are_taken_out_of_training():
    cleaned, report = leakage.leak_free_splits({"dermmel": DERMMEL, "ham10000": HAM})
    # DermMel's 982 originals are byte-identical copies of HAM10000 files with the same ISIC ids
    assert report.pair_counts() == {("dermmel", "ham10000"): 982}
    assert all(image.by == ("content", "isic_id") for image in report.shared)
    evaluation = {
        content_hash(s.path) for splits_ in cleaned.values() for split in ("valid", "test") for s in splits_[split]
    }
    for per_split in cleaned.values():
        assert not any(content_hash(s.path) in evaluation for s in per_split["train"])
