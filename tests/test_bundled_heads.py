"""Heads on the bundled model: `backbone.init = "bundled"`, preprocessing from an mvit init model,
and the worked example of docs/training.md, run from its own text."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mvit
from clirun import call_mvit, run_mvit
from mvit.errors import ConfigError
from mvit.core import model_file
from mvit.train.config import load_config, validate_config
from mvit.train.model_setup import build_model
from test_registry import fake_distribution
from training_data import paint

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
SECTION = "## Add your dataset's heads to the bundled model"
BUNDLED_HEADS = {"dermmel", "ham10000", "ham10000-mel", "ph2", "ph2-mel"}


def bundled_preprocessing():
    return model_file.read_metadata(model_file.bundled_model_path()).preprocessing


def raw_config(**sections):
    return {"output": "run", "datasets": [{"name": "ph2", "root": "ph2"}], **sections}


# ---- init = "bundled", and preprocessing from an mvit init model -------------------------------


def test_bundled_names_the_model_that_comes_with_mvit_and_is_not_a_path(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('output = "run"\n[[datasets]]\nname = "ph2"\nroot = "ph2"\n[backbone]\ninit = "bundled"\n')
    config = load_config(path)
    assert config.backbone.init == "bundled"
    assert config.preprocessing == bundled_preprocessing() and config.preprocessing.image_size == 128
    model = build_model(config, [], print)
    bundled = mvit.load()
    assert set(model.heads) == set()  # a backbone that will be fine-tuned keeps no stale heads
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), bundled.backbone.state_dict().values()))


def test_a_missing_init_named_default_asks_whether_bundled_was_meant(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('output = "run"\n[[datasets]]\nname = "ph2"\nroot = "ph2"\n[backbone]\ninit = "default"\n')
    config = load_config(path)
    with pytest.raises(ConfigError) as refused:
        build_model(config, [], print)
    assert str(refused.value) == f'backbone.init {tmp_path / "default"}: no such file; did you mean init = "bundled"? (the model that comes with mvit)'


def test_preprocessing_fields_set_in_the_config_win_over_the_init_models():
    config = validate_config(raw_config(backbone={"init": "bundled"}, preprocessing={"crop_fraction": 1.0},
                                         unfreeze={"mode": "none"}))
    assert config.preprocessing == bundled_preprocessing().model_copy(update={"crop_fraction": 1.0})
    warnings = []
    build_model(config, [], warnings.append)
    assert len(warnings) == 1 and "crop_fraction = 1.0" in warnings[0]
    # a timm or random init has no preprocessing of its own: the defaults stay
    assert validate_config(raw_config(backbone={"init": "random"})).preprocessing.image_size == 224


def test_another_image_size_is_resampled_with_a_warning_where_the_patch_allows_it():
    config = validate_config(raw_config(backbone={"init": "bundled"}, preprocessing={"image_size": 96},
                                         unfreeze={"mode": "none"}))
    assert config.preprocessing.crop_fraction == bundled_preprocessing().crop_fraction
    warnings = []
    model = build_model(config, [], warnings.append)
    assert model.backbone.config.image_size == 96 and model.backbone.position_embedding.shape[1] == 1 + 12 * 12
    assert len(warnings) == 1 and "the bundled model was trained at 128 px" in warnings[0] and "96 px" in warnings[0]
    assert model.ood_gate is None  # fitted on 128 px features: not kept for 96 px images
    odd = validate_config(raw_config(backbone={"init": "bundled"}, preprocessing={"image_size": 100}))
    with pytest.raises(ConfigError, match="image_size 100 does not fit .* multiple of 8"):
        build_model(odd, [], print)


# ---- the worked example of docs/training.md, from its own text ---------------------------------


def documented_config() -> str:
    """The TOML block of the section "Add your dataset's heads to the bundled model"."""
    text = DOCS.read_text()
    assert SECTION in text, f"docs/training.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold exactly one TOML config"
    return blocks[0]


def make_mydata(root: Path, lesions_per_label: int = 8) -> None:
    """A dataset in the layout `mvit plugins new` writes a loader for: labels.csv and images/."""
    labels = ("melanoma", "nevus", "keratosis")  # the scaffold's
    (root / "images").mkdir(parents=True)
    rows = []
    for index, label in enumerate(labels):
        for lesion in range(lesions_per_label):
            name = f"{label}{lesion}.jpg"
            paint(root / "images" / name, index)
            rows.append({"image": name, "label": label, "lesion": f"{label}-{lesion}"})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "lesion"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow
def test_the_documented_example_adds_heads_to_the_bundled_model(tmp_path, capsys, monkeypatch):
    package = tmp_path / "mvit-mydata"
    made = call_mvit(capsys, monkeypatch, "plugins", "new", "mydata", "--output", str(package))
    assert made.code == 0, made.stderr
    site = tmp_path / "site"  # "pip install": the package's entry point, as importlib.metadata sees it
    fake_distribution(site, "mvit-mydata", {"mydata": "mvit_mydata"})
    env = {"PYTHONPATH": f"{site}:{package / 'src'}"}
    make_mydata(tmp_path / "data" / "mydata")
    config = tmp_path / "mydata-on-bundled.toml"
    config.write_text(documented_config())

    checked = run_mvit("data", "check", "mydata", "--root", str(tmp_path / "data" / "mydata"), env=env)
    assert checked.code == 0, checked.stderr
    trained = run_mvit("train", str(config), "--epochs", "2", "--device", "cpu", "--set", "training.batch_size=8",
                       "--set", "runtime.workers=0", env=env, timeout=300)
    assert trained.code == 0, trained.stderr
    warned = [line for line in trained.stderr.splitlines() if line.startswith("warning: ")]
    assert not [line for line in warned if "preprocessing" in line or "dropped" in line or "px" in line], warned

    run = tmp_path / "runs" / "mydata-on-bundled"
    best = run / "best.safetensors"
    model, bundled = mvit.load(best), mvit.load()
    assert set(model.heads) == BUNDLED_HEADS | {"mydata", "mydata-mel"}
    assert model.preprocessing == bundled.preprocessing and model.preprocessing.image_size == 128
    assert json.loads((run / "config.json").read_text())["preprocessing"]["image_size"] == 128
    before, after = load_file(str(model_file.bundled_model_path())), load_file(str(best))
    kept = [name for name in before if name.startswith(("backbone.", "ood.")) or
            name.split(".")[1] in BUNDLED_HEADS and name.startswith("classifiers.")]
    assert len(kept) == len([n for n in before if n.startswith(("backbone.", "classifiers.", "ood."))])
    for name in kept:  # the backbone, the bundled heads and the gate are untouched
        assert torch.equal(before[name], after[name]), name
    for name in BUNDLED_HEADS:
        assert model.heads[name] == bundled.heads[name]  # classes, temperature, threshold, metrics
    assert model.heads["mydata-mel"].calibrated and model.heads["mydata"].classes == ("melanoma", "nevus", "keratosis")

    image = tmp_path / "data" / "mydata" / "images" / "melanoma0.jpg"
    predicted = run_mvit("predict", "--model", str(best), "--head", "mydata-mel", str(image), "--format", "json", env=env)
    assert predicted.code == 0, predicted.stderr
    records = json.loads(predicted.stdout)
    records = records if isinstance(records, list) else [records]
    assert [record["head"] for record in records] == ["mydata-mel"], records
    assert set(records[0]["probabilities"]) == {"melanoma", "not_melanoma"}
