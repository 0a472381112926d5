"""A new user's first hour with plugins: `mvit plugins new` names a clash before the package is
installed, the scaffold's tests follow its loader's layout, the model card's PH2 split is the one
mvit computes, and the docs take a user from set-up to heads trained on the bundled model."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from clirun import call_mvit
from conftest import SHARED_DATA
from datasets_factory import make_ph2
from mvit.datasets.check import check_dataset
from mvit.datasets.scaffold import name_clash, write_plugin
from mvit.plugins import ph2
from mvit.registry import manager
from test_scaffold import installed_and_tested, listed_plugin

REPO = Path(__file__).resolve().parents[1]
MODEL_CARD = REPO / "docs" / "model-card.md"


@pytest.fixture(autouse=True)
def fresh_registry():
    manager.reset()
    yield
    manager.reset()


# ---- a name that clashes -----------------------------------------------------------------------


def test_a_plugin_named_after_a_built_in_dataset_is_written_with_one_warning_naming_the_clash(capsys, monkeypatch, tmp_path):
    package = tmp_path / "mvit-ph2"
    run = call_mvit(capsys, monkeypatch, "plugins", "new", "ph2", "--output", str(package))
    assert run.code == 0, run.stderr
    assert (package / "src" / "mvit_ph2" / "__init__.py").is_file()  # written all the same
    assert run.stderr.splitlines() == [
        "warning: the built-in plugin 'ph2' already registers the dataset 'ph2' and the heads 'ph2', 'ph2-mel', "
        "so once installed, this package would be skipped as a clash; choose another name"
    ]


def test_a_plugin_named_after_an_installed_third_party_dataset_is_warned_about(capsys, monkeypatch, tmp_path):
    # the example plugin, installed for real by `make install`
    run = call_mvit(capsys, monkeypatch, "plugins", "new", "isic2019", "--output", str(tmp_path / "p"))
    assert run.code == 0, run.stderr
    assert run.stderr.splitlines() == [
        "warning: the plugin 'isic2019' (mvit-isic2019) already registers the dataset 'isic2019' and the heads "
        "'isic2019', 'isic2019-mel', so with both installed, mvit would skip one of the two as a clash; choose another name"
    ]


def test_a_head_name_or_a_plugin_name_alone_is_a_clash_too(tmp_path):
    assert "already registers the head 'ph2-mel'" in name_clash("ph2-mel", write_plugin("ph2-mel", tmp_path / "a"))
    holder = type("derm", (), {})  # an in-process plugin named like the package's entry point, registering nothing
    with manager.temporary_plugins(holder, entry_points=False):
        clash = name_clash("derm", write_plugin("derm", tmp_path / "b"))
    assert clash.startswith("the plugin 'derm' (in-process) already uses the plugin name 'derm', so with both installed")


def test_a_fresh_name_is_written_without_a_warning(capsys, monkeypatch, tmp_path):
    run = call_mvit(capsys, monkeypatch, "plugins", "new", "derm-site", "--output", str(tmp_path / "p"))
    assert run.code == 0 and run.stderr == "", run.stderr


# ---- the scaffold's tests follow its loader ----------------------------------------------------

LAYOUT_CONSTANTS = ("LABELS_FILE", "IMAGES", "IMAGE_COLUMN", "LABEL_COLUMN", "LESION_COLUMN")


def test_the_scaffolds_tests_name_no_file_or_column_of_the_layout_themselves(tmp_path):
    package = write_plugin("derm-site", tmp_path / "p")
    module = (package / "src" / "mvit_derm_site" / "__init__.py").read_text()
    tests = (package / "tests" / "test_plugin.py").read_text()
    values = {constant: re.search(rf'^{constant} = "([^"]+)"', module, re.MULTILINE) for constant in LAYOUT_CONSTANTS}
    for constant, value in values.items():
        assert value, f"the loader has no {constant}"
        assert f'"{value.group(1)}"' not in tests, f"the tests repeat {constant}"
        assert f"plugin.{constant}" in tests, constant
    assert values["LABELS_FILE"].group(1) not in tests  # not even in an expected error message


@pytest.mark.slow
def test_the_scaffolds_tests_pass_after_the_loaders_layout_is_changed(tmp_path):
    """A user who renames the labels file, the images folder and every column in the loader's
    constants gets generated tests that still pass, because they write the dataset from them."""
    package = write_plugin("derm-site", tmp_path / "mvit-derm-site")
    module = package / "src" / "mvit_derm_site" / "__init__.py"
    text = module.read_text()
    changed = {"LABELS_FILE": "ground_truth.csv", "IMAGES": "pictures", "IMAGE_COLUMN": "file",
               "LABEL_COLUMN": "diagnosis", "LESION_COLUMN": "patient"}
    for constant, value in changed.items():
        text, replaced = re.subn(rf'^{constant} = "[^"]+"', f'{constant} = "{value}"', text, flags=re.MULTILINE)
        assert replaced == 1, f"the loader has no {constant}"
    module.write_text(text)
    listed_plugin(installed_and_tested(package, tmp_path), "derm-site")


# ---- the model card's PH2 split ----------------------------------------------------------------


def card_ph2() -> dict:
    """The model card's PH2 row: images per diagnosis, split fractions (%), seed, images per split."""
    [row] = [line for line in MODEL_CARD.read_text().splitlines() if line.startswith("| PH2 ")]
    classes = {name: int(n) for n, name in re.findall(r"(\d+) (common nevus|atypical nevus|melanoma)", row)}
    split = re.search(r"(\d+)/(\d+)/(\d+) stratified, seed (\d+): (\d+) / (\d+) / (\d+)", row)
    assert len(classes) == 3 and split, f"the model card's PH2 row no longer reads as expected: {row}"
    numbers = [int(n) for n in split.groups()]
    return {"classes": classes, "percent": numbers[:3], "seed": numbers[3], "images": numbers[4:]}


def split_sizes(root: Path, seed: int) -> tuple[dict[str, int], list[int]]:
    """Images per label, and per split (train, valid, test), as `mvit data check ph2` counts them."""
    report = check_dataset("ph2", root, seed=seed)
    assert report.usable, report.errors
    per_label = {label: sum(counts.get(label, 0) for counts in report.counts.values()) for label in ph2.LABELS}
    return per_label, [sum(counts.values()) for counts in report.counts.values()]


def test_the_model_cards_ph2_split_is_the_one_mvit_computes_for_its_class_counts(tmp_path):
    """The split sizes depend on the images per label alone (each label's groups are dealt out in
    turn), so a generated PH2 folder with the card's class counts splits as the real one does."""
    card = card_ph2()
    assert [round(100 * f) for f in manager.get_dataset("ph2").split_fractions.values()] == card["percent"]
    code = {label: code for code, label in ph2.DIAGNOSES.items()}  # PH2_dataset.txt's Clinical Diagnosis
    root = make_ph2(tmp_path, {code[name.replace(" ", "_")]: n for name, n in card["classes"].items()})
    assert split_sizes(root, card["seed"])[1] == card["images"]


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "ph2" / "PH2Dataset").is_dir(), reason=f"the real PH2 folder under {SHARED_DATA} is absent")
def test_the_model_cards_ph2_row_matches_the_real_ph2_folder():
    card = card_ph2()
    per_label, per_split = split_sizes(SHARED_DATA / "ph2", card["seed"])
    assert per_label == {name.replace(" ", "_"): n for name, n in card["classes"].items()}
    assert per_split == card["images"]


# ---- the docs: from set-up to heads on the bundled model ---------------------------------------


def section(path: Path, title: str) -> str:
    """The text of the `## [N. ]TITLE` section of a Markdown file, up to the next `## ` heading."""
    found = re.search(rf"^## (?:\d+\. )?{re.escape(title)}\n(.*?)(?=^## |\Z)", path.read_text(), re.MULTILINE | re.DOTALL)
    assert found, f"{path.name} has no section {title!r}"
    return found.group(1)


def config_of(text: str) -> dict:
    [block] = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    return tomllib.loads(block)


def test_the_plugin_docs_train_its_heads_on_the_bundled_model_as_the_training_docs_do():
    text = section(REPO / "docs" / "plugins.md", "Train your heads on the bundled model")
    config = config_of(text)
    # the same config as training.md's worked example, which tests/test_bundled_heads.py runs
    assert config == config_of(section(REPO / "docs" / "training.md", "Add your dataset's heads to the bundled model"))
    assert config["backbone"]["init"] == "bundled" and config["unfreeze"]["mode"] == "none"
    assert "mvit train " in text
    assert f"mvit predict --model {config['output']}/best.safetensors --head " in text


def test_the_readme_says_how_to_run_mvit_before_its_tour_and_keeps_its_test_command():
    text = (REPO / "README.md").read_text()
    before_tour = text[:text.index("$ mvit ", text.index("## A tour of the command line"))]  # its bare `mvit`
    assert ". .venv/bin/activate" in before_tour and "make install" in before_tour
    assert "--index-url https://download.pytorch.org/whl/cpu" in before_tour
    assert "configs/seed-recipe.toml" in before_tour and "internet" in before_tour
    assert "```console\n$ make test\n```" in text  # the command CI runs
