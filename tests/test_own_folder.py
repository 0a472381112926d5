"""Your own images without a plugin: a folder of class sub-folders or a CSV of image,label[,group]
(`mvit.datasets.folder`), as a training config's `[datasets.folder]` dataset, `mvit data check
--folder` and `mvit evaluate --folder`; and the variant of docs/training.md's worked example, run
from its own text."""

from __future__ import annotations

import csv
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

import mvit
from clirun import call_mvit
from mvit.datasets import folder
from mvit.errors import ConfigError
from mvit.registry import labels_file, manager
from mvit.train import trainer as training
from mvit.train.tasks import build_tasks
from training_data import TINY_SETTINGS, paint, tiny_run_config, to_toml

LABELS = ("melanoma", "nevus")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
SECTION = "## Your own images, without a plugin"
BUNDLED_HEADS = {"dermmel", "ham10000", "ham10000-mel", "ph2", "ph2-mel"}
LAYOUT = "a folder of class sub-folders (ROOT/CLASS/*.jpg) or a CSV file with the columns image,label[,group]"


def make_class_folders(root: Path, labels=LABELS, per_class: int = 12) -> Path:
    """ROOT/<label>/*.jpg, each image painted with its class's colour so a tiny model learns it."""
    for index, label in enumerate(labels):
        (root / label).mkdir(parents=True)
        for n in range(per_class):
            paint(root / label / f"{label}{n}.jpg", index)
    return root


def make_labels_csv(folder: Path, per_class: int = 12) -> Path:
    """folder/labels.csv (image,label,group: two images per lesion) and folder/images/."""
    (folder / "images").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "group"])
        for index, label in enumerate(LABELS):
            for n in range(per_class):
                paint(folder / "images" / f"{label}{n}.jpg", index)
                writer.writerow([f"images/{label}{n}.jpg", label, f"{label}-lesion{n // 2}"])
    return folder / "labels.csv"


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- training from a config ---------------------------------------------------------------------


def test_a_folder_of_class_sub_folders_trains_its_head_from_a_training_config(tmp_path):
    root = make_class_folders(tmp_path / "lesions")
    own = {"name": "lesions", "root": str(root), "folder": {"positive": "melanoma"}}
    config = tiny_run_config(root, tmp_path / "run", {"datasets": [own], "training": {"epochs": 2}})
    with manager.temporary_plugins():  # the run adds its own dataset to this process's registry: for this test only
        best = training.train(config)
    model = mvit.load(best)
    head = model.heads["lesions"]
    assert (head.dataset, head.classes, head.positive) == ("lesions", LABELS, "melanoma")  # the sub-folders, sorted
    assert head.calibrated and head.threshold is not None  # calibrated on the valid split, as any plugin's head
    assert "lesions" in model.provenance["splits"]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["datasets"][0]
    assert recorded["folder"] == {"classes": None, "positive": "melanoma", "diagnoses": {}}  # what a resume rebuilds it from
    assert "lesions" not in {spec.name for spec in manager.list_datasets()}  # and gone with the block


def test_a_csv_labels_file_trains_through_the_command_line_and_evaluate_folder_tests_on_its_held_out_split(
        tmp_path, capsys, monkeypatch):
    labels = make_labels_csv(tmp_path / "data")
    config = tmp_path / "mine.toml"
    config.write_text(to_toml({"output": "run", **TINY_SETTINGS}) + (
        '\n[[datasets]]\nname = "mine"\nroot = "data/labels.csv"   # relative to the config, a file\n'
        '\n[datasets.folder]\nclasses = ["nevus", "melanoma"]\npositive = "melanoma"\n'))

    extracted = call_mvit(capsys, monkeypatch, "extract", str(config))  # `mvit extract` sees the dataset too
    assert extracted.code == 0, extracted.stderr
    trained = call_mvit(capsys, monkeypatch, "train", str(config), "--epochs", "2")
    assert trained.code == 0, trained.stderr
    best = tmp_path / "run" / "best.safetensors"
    head = mvit.load(best).heads["mine"]
    assert (head.classes, head.positive) == (("nevus", "melanoma"), "melanoma")  # declared, in that order

    checked = call_mvit(capsys, monkeypatch, "data", "check", "mine", "--folder", str(labels), "--format", "json")
    assert checked.code == 0, checked.stderr
    held_out = sum(json.loads(checked.stdout)["counts"]["test"].values())
    monkeypatch.chdir(tmp_path / "data")  # the CSV spelled another way: the same split
    report = tmp_path / "report"
    evaluated = call_mvit(capsys, monkeypatch, "evaluate", "--model", str(best), "--head", "mine",
                          "--folder", "labels.csv", "--out", str(report), "--device", "cpu")
    assert evaluated.code == 0, evaluated.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == held_out > 0 and (report / "predictions.csv").is_file()
    assert metrics["leaked_training_images"] == 0  # the test split training held out, not another


def test_a_name_an_installed_plugin_holds_or_a_head_that_cannot_be_is_one_sentence_naming_the_dataset(tmp_path):
    root = make_class_folders(tmp_path / "lesions", per_class=3)
    taken = tiny_run_config(root, tmp_path / "run", {"datasets": [{"name": "ph2", "root": str(root), "folder": {}}]})
    with manager.temporary_plugins(), pytest.raises(ConfigError) as refused:
        build_tasks(taken, print)
    assert str(refused.value) == (f"datasets.0 (ph2, your own dataset at {root}): the dataset name 'ph2' is taken by "
                                  f"the installed plugin 'ph2'; give your own dataset another name")
    wrong = tiny_run_config(root, tmp_path / "run", {"datasets": [{"name": "mine", "root": str(root), "folder": {"positive": "mel"}}]})
    with manager.temporary_plugins(), pytest.raises(ConfigError) as refused:
        build_tasks(wrong, print)
    assert str(refused.value) == (f"datasets.0 (mine, your own dataset at {root}): head 'mine': positive class 'mel' is "
                                  f"not one of its classes ['melanoma', 'nevus']")


def test_your_dataset_added_again_replaces_itself_and_reset_forgets_it(tmp_path):
    root = make_class_folders(tmp_path / "lesions", per_class=3)
    with manager.temporary_plugins():
        for classes in (None, ["nevus", "melanoma"]):  # a second run (or a resume) in the same process
            folder.register(folder.own_dataset("lesions", root, classes=classes))
        assert manager.get_head("lesions").classes == ("nevus", "melanoma")
        assert not [w for w in manager.registry().warnings if "lesions" in w.sentence()]  # no clash with itself
        assert "ph2" in manager.registry().datasets  # beside the installed plugins
        manager.reset()
        assert "lesions" not in manager.registry().datasets


# ---- mvit data check --folder -------------------------------------------------------------------


def test_data_check_folder_counts_each_class_per_split_and_lists_loose_images(tmp_path, capsys, monkeypatch):
    root = make_class_folders(tmp_path / "lesions")
    paint(root / "loose.jpg", 0)  # in no class sub-folder: no label
    checked = call_mvit(capsys, monkeypatch, "data", "check", "--folder", str(root), "--format", "json")
    assert checked.code == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["usable"] and report["images"] == 24
    assert report["counts"] == {"train": {"melanoma": 8, "nevus": 8}, "valid": {"melanoma": 2, "nevus": 2},
                                "test": {"melanoma": 2, "nevus": 2}}  # 70/15/15, stratified by label
    assert report["unlabelled_images"] == [str(root / "loose.jpg")]
    table = call_mvit(capsys, monkeypatch, "data", "check", "--folder", str(root))
    assert table.code == 0 and "folder: 24 images, usable" in table.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "loose images"])
def test_data_check_folder_says_in_one_sentence_what_a_wrong_folder_lacks(tmp_path, capsys, monkeypatch, case):
    root = tmp_path / "lesions"
    if case != "missing":
        root.mkdir()
    if case == "loose images":
        paint(root / "a.jpg", 0)
    checked = call_mvit(capsys, monkeypatch, "data", "check", "--folder", str(root))
    expected = {
        "missing": f"there is no folder or CSV file at {root}; your own dataset is {LAYOUT}",
        "empty": f"{root} has no sub-folder of images (it holds no images); your own dataset is {LAYOUT}",
        "loose images": f"{root} has no sub-folder of images (its images are not in class sub-folders); your own dataset is {LAYOUT}",
    }[case]
    assert checked.code == 2 and lines(checked.stderr) == [f"error: {expected}"]


def test_the_csv_is_read_by_the_reader_of_adapt_labels(tmp_path, capsys, monkeypatch):
    read = []
    real = labels_file.read_labels_file

    def spy(path):
        read.append(Path(path))
        return real(path)

    monkeypatch.setattr(labels_file, "read_labels_file", spy)
    good = make_labels_csv(tmp_path / "good")
    assert call_mvit(capsys, monkeypatch, "data", "check", "--folder", str(good)).code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("file,diagnosis\na.jpg,melanoma\n")
    checked = call_mvit(capsys, monkeypatch, "data", "check", "--folder", str(bad))
    adapted = call_mvit(capsys, monkeypatch, "adapt", "--site", "clinic", "--labels", str(bad),
                        "-o", str(tmp_path / "out.safetensors"), "--cache", str(tmp_path / "cache.h5"))
    assert {good, bad} <= set(read) and read[-1] == bad  # one function read the CSV for both commands
    assert checked.code == adapted.code == 2
    assert lines(checked.stderr) == lines(adapted.stderr) == [
        f"error: the labels file {bad} has no image or label column (its header: file,diagnosis); "
        f"its first row must name the columns image,label[,group]"]


# ---- mvit evaluate --folder ----------------------------------------------------------------------


def test_evaluate_folder_scores_a_head_trained_on_other_data_on_your_folder(tmp_path, capsys, monkeypatch):
    root = make_class_folders(tmp_path / "clinic", labels=("melanoma", "not_melanoma"), per_class=5)
    report = tmp_path / "report"
    evaluated = call_mvit(capsys, monkeypatch, "evaluate", "--head", "ham10000-mel", "--folder", str(root),
                          "--split", "all", "--out", str(report), "--device", "cpu")  # the bundled model's head
    assert evaluated.code == 0, evaluated.stderr
    assert json.loads((report / "metrics.json").read_text())["n"] == 10
    both = call_mvit(capsys, monkeypatch, "evaluate", "--head", "ham10000-mel", "--folder", str(root),
                     "--root", str(root), "--out", str(report))
    assert both.code == 2 and lines(both.stderr) == [
        "error: --folder is the dataset evaluated, in place of --root and --dataset: leave those out"]


# ---- the variant of docs/training.md's worked example, from its own text -------------------------


def documented_example() -> tuple[list[list[str]], str]:
    """The commands (`$ mvit ...`, comments off) and the TOML config of the section on your own images."""
    text = DOCS.read_text()
    assert SECTION in text, f"docs/training.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    [console] = re.findall(r"```console\n(.*?)```", section, flags=re.S)
    [config] = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    commands = [shlex.split(line[2:].split("#", 1)[0]) for line in console.splitlines() if line.startswith("$ mvit ")]
    return [command[1:] for command in commands], config


def test_the_documented_own_folder_example_checks_trains_and_evaluates(tmp_path, capsys, monkeypatch):
    commands, config = documented_example()
    settings = tomllib.loads(config)
    assert "folder" in settings["datasets"][0] and [c[0] for c in commands] == ["data", "train", "evaluate"]
    make_class_folders(tmp_path / settings["datasets"][0]["root"])
    (tmp_path / "lesions-on-bundled.toml").write_text(config)
    monkeypatch.chdir(tmp_path)
    fast = ["--device", "cpu", "--set", "runtime.workers=0", "--set", "training.batch_size=8"]
    for command in commands:
        done = call_mvit(capsys, monkeypatch, *command, *(fast if command[0] == "train" else []))
        assert done.code == 0, (command, done.stderr)

    model, bundled = mvit.load(tmp_path / settings["output"] / "best.safetensors"), mvit.load()
    assert set(model.heads) == BUNDLED_HEADS | {"lesions"}
    head = model.heads["lesions"]
    assert (head.classes, head.positive, head.calibrated) == (LABELS, "melanoma", True)
    for name in BUNDLED_HEADS:  # a frozen backbone keeps the bundled heads as they were
        assert model.heads[name] == bundled.heads[name]
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n"] == 4  # the held-out test split
