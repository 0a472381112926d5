"""The third-party example plugin, installed for real (`make test` pip-installs it), used as a user would."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from clirun import run_mvit
from datasets_factory import ISIC2019_COLUMNS, make_isic2019, write_csv

DIST = "mvit-isic2019"


@pytest.fixture(scope="module", autouse=True)
def installed():
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed; run `pip install -e examples/mvit-isic2019` (make test does)")


def test_mvit_plugins_lists_the_example_with_its_distribution_and_heads():
    result = run_mvit("plugins", "--format", "json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    plugin = next(p for p in summary["plugins"] if p["name"] == "isic2019")
    assert plugin == {
        "name": "isic2019", "distribution": DIST, "version": "0.1.0",
        "datasets": ["isic2019"], "heads": ["isic2019", "isic2019-mel"],
    }
    heads = {h["name"]: h for h in summary["heads"]}
    assert heads["isic2019"]["classes"] == ["mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc"]
    assert heads["isic2019-mel"]["positive"] == "melanoma"


def test_the_env_var_picks_the_example_by_distribution_name():
    result = run_mvit("plugins", "--format", "json", env={"MVIT_LOAD_PLUGINS": DIST})
    assert [p["name"] for p in json.loads(result.stdout)["plugins"]] == ["isic2019"]


def test_mvit_data_check_on_the_one_hot_layout(tmp_path):
    root = make_isic2019(tmp_path)
    result = run_mvit("data", "check", "isic2019", "--root", str(root), "--format", "json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["usable"] and report["images"] == 24
    totals = {}
    for counts in report["counts"].values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + n
    assert totals == {label: 3 for label in ISIC2019_COLUMNS[1:-1]}


def test_a_row_with_two_diagnoses_is_one_sentence_and_exit_2(tmp_path):
    root = make_isic2019(tmp_path)
    rows = [
        {"image": "ISIC_0040000", **{c: "0.0" for c in ISIC2019_COLUMNS[1:]}, "MEL": "1.0", "NV": "1.0"},
    ]
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", rows, ISIC2019_COLUMNS)
    result = run_mvit("data", "check", "isic2019", "--root", str(root))
    assert result.code == 2
    assert "line 2: image ISIC_0040000 has 2 diagnoses set to 1.0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
