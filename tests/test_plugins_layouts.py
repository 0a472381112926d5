"""The built-in plugins on generated folders in each dataset's real layout: good and bad."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from clirun import call_mvit
from datasets_factory import (
    ham_rows,
    make_dermmel,
    make_ham10000,
    make_ph2,
    ph2_row,
    truncate,
    write_image,
)
from mvit.errors import DatasetError, PluginError
from mvit.datasets import splits
from mvit.registry import DatasetSpec, HeadSpec, Sample, hookimpl, manager
from mvit.datasets.check import check_dataset
from mvit.datasets.records import class_indices, load_samples, read_dataset


@pytest.fixture(autouse=True)
def fresh_registry():
    manager.reset()
    yield
    manager.reset()


def by_split_and_label(samples):
    return Counter((s.split, s.label) for s in samples)


# ---- DermMel -----------------------------------------------------------------------------------


def test_dermmel_reads_its_split_folders_and_flags_augmented_copies(tmp_path):
    root = make_dermmel(tmp_path, augmented=2)
    samples = load_samples("dermmel", root)
    assert by_split_and_label(samples) == {
        ("train", "Melanoma"): 8, ("train", "NotMelanoma"): 6,
        ("valid", "Melanoma"): 3, ("valid", "NotMelanoma"): 3,
        ("test", "Melanoma"): 3, ("test", "NotMelanoma"): 3,
    }
    augmented = [s for s in samples if s.meta["augmented"]]
    assert sorted(s.path.name for s in augmented) == ["AUG_0_0.jpeg", "AUG_0_1.jpeg"]
    assert {s.split for s in augmented} == {"train"}
    assert next(s for s in samples if s.path.name == "ISIC_0024306.jpg").group == "ISIC_0024306"
    # the folder that holds train_sep/ works as a root too
    assert len(load_samples("dermmel", root / "DermMel")) == len(samples)


def test_dermmel_check_is_usable_and_counts_per_split(tmp_path, capsys, monkeypatch):
    root = make_dermmel(tmp_path)
    report = check_dataset("dermmel", root)
    assert report.usable and report.errors == [] and report.warnings == []
    assert report.counts == {
        "train": {"Melanoma": 8, "NotMelanoma": 6}, "valid": {"Melanoma": 3, "NotMelanoma": 3},
        "test": {"Melanoma": 3, "NotMelanoma": 3},
    }
    assert report.augmented == {"train": 2, "valid": 0, "test": 0}
    result = call_mvit(capsys, monkeypatch, "data", "check", "dermmel", "--root", str(root))
    assert result.code == 0 and "usable" in result.stdout


def test_dermmel_augmented_copies_in_evaluation_folders_are_left_out(tmp_path):
    root = make_dermmel(tmp_path)
    write_image(root / "DermMel" / "valid" / "Melanoma" / "AUG_0_9.jpeg")
    result = splits.split_dataset("dermmel", root)
    assert all(not s.meta["augmented"] for s in result["valid"] + result["test"])
    report = check_dataset("dermmel", root)
    assert report.usable
    assert [Path(p).name for p in report.augmented_in_evaluation] == ["AUG_0_9.jpeg"]
    assert "1 augmented copy in evaluation splits, left out" in report.warnings[0]


def test_dermmel_wrong_layouts_name_the_problem(tmp_path, capsys, monkeypatch):
    root = make_dermmel(tmp_path)
    shutil.rmtree(root / "DermMel" / "test")
    with pytest.raises(DatasetError, match=r"is not a DermMel folder: expected train_sep/, valid/ and test/"):
        load_samples("dermmel", root)
    result = call_mvit(capsys, monkeypatch, "data", "check", "dermmel", "--root", str(root))
    assert result.code == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr + result.stdout

    other = make_dermmel(tmp_path / "other")
    write_image(other / "DermMel" / "valid" / "Benign" / "x.jpg")
    with pytest.raises(DatasetError, match=r"valid/Benign is not a DermMel class folder \(expected Melanoma or NotMelanoma\)"):
        load_samples("dermmel", other)


def test_dermmel_stray_image_is_an_unlabelled_warning(tmp_path):
    root = make_dermmel(tmp_path)
    stray = write_image(root / "DermMel" / "train_sep" / "stray.jpg")
    report = check_dataset("dermmel", root)
    assert report.usable and report.unlabelled_images == [str(stray)]


# ---- HAM10000 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["parts", "single"])
def test_ham10000_reads_the_metadata_csv_and_finds_images_in_either_layout(tmp_path, layout):
    root = make_ham10000(tmp_path, layout=layout)
    samples = load_samples("ham10000", root)
    assert len(samples) == 84
    assert Counter(s.label for s in samples) == {dx: 12 for dx in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
    first = samples[0]
    assert first.group == "HAM_0000000" and first.meta["image_id"] == "ISIC_0024306"
    assert first.meta["localization"] == "back" and first.split is None
    if layout == "parts":
        assert {s.path.parent.name for s in samples} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert check_dataset("ham10000", root).usable


def test_ham10000_splits_keep_each_lesion_in_one_split(tmp_path):
    root = make_ham10000(tmp_path)
    result = splits.split_dataset("ham10000", root, seed=5)
    owner = {}
    for split, items in result.items():
        for sample in items:
            assert owner.setdefault(sample.group, split) == split
    assert {split: len(items) for split, items in result.items()} == {"train": 56, "valid": 14, "test": 14}


def test_ham10000_csv_without_expected_columns(tmp_path, capsys, monkeypatch):
    root = make_ham10000(tmp_path, columns=("lesion_id", "image_id", "diagnosis"))
    with pytest.raises(DatasetError, match=r"HAM10000_metadata.csv lacks the column\(s\) dx .*it needs lesion_id, image_id, dx"):
        load_samples("ham10000", root)
    result = call_mvit(capsys, monkeypatch, "data", "check", "ham10000", "--root", str(root))
    assert result.code == 2 and "lacks the column(s) dx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ham10000_label_the_dataset_does_not_know(tmp_path):
    rows = ham_rows(per_class=1, images_per_lesion=1)
    rows[3]["dx"] = "melanoma"
    root = make_ham10000(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"line 5: dx 'melanoma' is not one of akiec, bcc, bkl, df, mel, nv, vasc"):
        load_samples("ham10000", root)


def test_ham10000_rows_without_images_and_images_without_rows(tmp_path, capsys, monkeypatch):
    root = make_ham10000(tmp_path)
    lost = root / "HAM10000_images_part_2" / "ISIC_0024389.jpg"
    lost.unlink()
    extra = write_image(root / "HAM10000_images_part_1" / "ISIC_0099999.jpg")
    report = check_dataset("ham10000", root)
    assert not report.usable
    assert [Path(p).name for p in report.missing_images] == ["ISIC_0024389.jpg"]
    assert report.unlabelled_images == [str(extra)]
    assert report.errors == [f"1 label row without its image: {report.missing_images[0]}"]  # one, not "1 ... rows"
    with pytest.raises(DatasetError, match=r"1 ham10000 label row without an image .*run `mvit data check ham10000"):
        load_samples("ham10000", root)
    result = call_mvit(capsys, monkeypatch, "data", "check", "ham10000", "--root", str(root))
    assert result.code == 1 and "NOT usable" in result.stdout and "ISIC_0024389" in result.stdout


def test_unreadable_images_are_named_and_make_the_dataset_unusable(tmp_path, capsys, monkeypatch):
    root = make_ham10000(tmp_path)
    cut = truncate(root / "HAM10000_images_part_1" / "ISIC_0024310.jpg")
    junk = root / "HAM10000_images_part_2" / "ISIC_0024380.jpg"
    junk.write_bytes(b"this is not a JPEG")
    report = check_dataset("ham10000", root)
    assert not report.usable
    assert sorted(bad.path for bad in report.unreadable_images) == sorted([str(cut), str(junk)])
    result = call_mvit(capsys, monkeypatch, "data", "check", "ham10000", "--root", str(root), "--format", "json")
    assert result.code == 1 and '"usable": false' in result.stdout


def test_identical_images_across_splits_are_a_warning(tmp_path):
    root = make_ham10000(tmp_path)
    result = splits.split_dataset("ham10000", root)
    source, target = result["train"][0].path, result["test"][0].path
    shutil.copy(source, target)
    report = check_dataset("ham10000", root)
    assert report.usable
    assert report.duplicates_across_splits == [[f"train: {source}", f"test: {target}"]]
    assert "identical across splits" in report.warnings[0]


def test_check_counts_as_csv(tmp_path, capsys, monkeypatch):
    root = make_ham10000(tmp_path)
    result = call_mvit(capsys, monkeypatch, "data", "check", "ham10000", "--root", str(root), "--format", "csv")
    lines = result.stdout.splitlines()
    assert lines[0] == "split,akiec,bcc,bkl,df,mel,nv,vasc,total,augmented"
    assert lines[1].startswith("train,") and lines[1].endswith(",56,0")


def test_heads_map_labels_to_class_indices(tmp_path):
    samples = load_samples("ham10000", make_ham10000(tmp_path))
    head = manager.get_head("ham10000-mel")
    indices = class_indices(head, samples)
    assert len(indices) == len(samples) and None not in indices  # the head uses every HAM10000 label
    assert {sample.label for sample, index in zip(samples, indices) if head.classes[index] == "melanoma"} == {"mel"}
    stranger = Sample(path=tmp_path / "x.jpg", label="unheard_of", group="x")
    with pytest.raises(DatasetError, match="label 'unheard_of', which head ph2 does not know"):
        class_indices(manager.get_head("ph2"), [stranger])


# ---- PH2 ---------------------------------------------------------------------------------------


def test_ph2_parses_the_table_with_blank_criteria_and_a_legend(tmp_path):
    root = make_ph2(tmp_path)
    samples = load_samples("ph2", root)
    assert Counter(s.label for s in samples) == {"common_nevus": 8, "atypical_nevus": 8, "melanoma": 4}
    blank = samples[0]
    assert blank.group == "IMD001" and blank.label == "common_nevus"
    assert blank.meta["Asymmetry"] is None and blank.meta["Colors"] == []
    full = samples[1]
    assert full.meta["Pigment Network"] == "T" and full.meta["Colors"] == [3, 4]
    assert samples[-1].meta["Histological Diagnosis"] == "Melanoma"
    assert samples[0].path.name == "IMD001.bmp" and samples[0].path.parent.name == "IMD001_Dermoscopic_Image"
    report = check_dataset("ph2", root)
    assert report.usable and report.unlabelled_images == []  # lesion masks are not unlabelled samples
    assert len(load_samples("ph2", root / "PH2Dataset")) == 20


def test_ph2_k_fold_cross_validation(tmp_path):
    root = make_ph2(tmp_path, {"0": 10, "1": 10, "2": 5})
    tested = Counter()
    for fold in range(5):
        result = splits.split_dataset("ph2", root, fold=fold, folds=5)
        assert len(result["test"]) == 5 and {s.label for s in result["test"]} == {"common_nevus", "atypical_nevus", "melanoma"}
        tested.update(s.group for s in result["test"])
    assert len(tested) == 25 and set(tested.values()) == {1}


def test_ph2_bad_rows_name_the_line(tmp_path):
    bad_code = make_ph2(tmp_path / "code", rows=[ph2_row("IMD001", "0"), ph2_row("IMD002", "7")])
    with pytest.raises(DatasetError, match=r"PH2_dataset.txt line 3: Clinical Diagnosis '7' for IMD002 is not 0, 1 or 2"):
        load_samples("ph2", bad_code)
    short = make_ph2(tmp_path / "short", rows=[ph2_row("IMD001", "0"), "|| IMD002 || || 1 ||"])
    with pytest.raises(DatasetError, match=r"line 3 has 3 cells where the header has 10"):
        load_samples("ph2", short)


def test_ph2_without_its_table(tmp_path):
    root = make_ph2(tmp_path)
    (root / "PH2Dataset" / "PH2_dataset.txt").unlink()
    with pytest.raises(DatasetError, match=r"has no PH2_dataset.txt \(nor PH2Dataset/PH2_dataset.txt\)"):
        load_samples("ph2", root)


# ---- any dataset -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dermmel", "ham10000", "ph2"])
def test_a_missing_root_is_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"the {name} folder {missing} does not exist"):
        load_samples(name, missing)
    result = call_mvit(capsys, monkeypatch, "data", "check", name, "--root", str(missing))
    assert result.code == 2
    assert result.stderr.startswith(f"error: the {name} folder") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make, other", [(make_dermmel, "ham10000"), (make_ham10000, "ph2"), (make_ph2, "dermmel")]
)
def test_a_folder_of_another_dataset_is_a_wrong_layout(tmp_path, make, other):
    with pytest.raises(DatasetError, match="the dataset folder must hold"):
        load_samples(other, make(tmp_path))


def test_an_unknown_dataset_name_is_exit_2(capsys, monkeypatch, tmp_path):
    result = call_mvit(capsys, monkeypatch, "data", "check", "isic2020", "--root", str(tmp_path))
    assert result.code == 2 and "no installed plugin offers a dataset named 'isic2020'" in result.stderr


class BuggyLoaderPlugin:
    @hookimpl
    def register_datasets(self, register):
        def load(root):
            return {}["oops"]

        register(DatasetSpec(name="buggy", title="buggy", labels=("a",), load=load))

    @hookimpl
    def register_heads(self, register):
        pass


class LyingLoaderPlugin:
    @hookimpl
    def register_datasets(self, register):
        def load(root):
            return [Sample(path=root / "x.jpg", label="undeclared", group="x")]

        register(DatasetSpec(name="lying", title="lying", labels=("a", "b"), load=load))

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="lying", dataset="lying", classes=("a", "b")))


def test_a_loader_bug_names_the_plugin_and_an_undeclared_label_names_the_file(tmp_path):
    with manager.temporary_plugins(BuggyLoaderPlugin(), LyingLoaderPlugin()):
        with pytest.raises(PluginError, match=r"the buggy loader of plugin 'BuggyLoaderPlugin' .* failed .*KeyError"):
            read_dataset(manager.get_dataset("buggy"), tmp_path)
        with pytest.raises(DatasetError, match=r"x.jpg has the label 'undeclared', which dataset lying does not know"):
            read_dataset(manager.get_dataset("lying"), tmp_path)
