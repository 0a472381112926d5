"""The plugin against mvit's own checks, on a tiny generated dataset."""

from __future__ import annotations

import csv
import random

import pytest
from PIL import Image

import mvit_old_lesions as plugin
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
