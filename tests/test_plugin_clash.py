"""A real installed plugin that takes a built-in dataset's name is skipped; everything else works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clirun import run_mvit
from datasets_factory import make_ph2, write_image
from mvit.datasets.scaffold import write_plugin


@pytest.fixture(scope="module")
def clashing_site(tmp_path_factory):
    """`mvit-clashing-ph2`, built like any plugin package and installed with pip into its own folder
    (a --target install: real dist-info and entry points, and the test venv stays as it was). Its
    entry point is named differently, but it registers a dataset and heads named `ph2`."""
    base = tmp_path_factory.mktemp("clash")
    package = write_plugin("ph2", base / "package")
    pyproject = package / "pyproject.toml"
    text = pyproject.read_text().replace('name = "mvit-ph2"', 'name = "mvit-clashing-ph2"')
    pyproject.write_text(text.replace('ph2 = "mvit_ph2"', 'clashing-ph2 = "mvit_ph2"'))
    site = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(package)],
        check=True, capture_output=True, timeout=300,
    )
    return {"PYTHONPATH": str(site)}


@pytest.mark.slow
def test_mvit_plugins_lists_the_built_ins_and_an_error_row(clashing_site):
    listing = run_mvit("plugins", env=clashing_site)
    assert listing.code == 0, listing.stderr
    assert "ph2-mel" in listing.stdout and "ham10000" in listing.stdout
    [row] = [line for line in listing.stderr.splitlines() if "clashing-ph2" in line]
    assert row.startswith("error: plugin 'clashing-ph2' (mvit-clashing-ph2) skipped: registers the dataset name 'ph2', "
                          "which plugin 'ph2' (mvit) already registered")
    summary = json.loads(run_mvit("plugins", "--format", "json", env=clashing_site).stdout)
    assert [(w["plugin"], w["level"]) for w in summary["warnings"]] == [("clashing-ph2", "error")]
    assert {p["name"]: p["distribution"] for p in summary["plugins"]}["ph2"] == "mvit"


@pytest.mark.slow
def test_the_built_in_ph2_still_predicts_and_checks(clashing_site, tmp_path):
    image = write_image(tmp_path / "lesion.jpg")
    predicted = run_mvit("predict", "--head", "ph2", "--format", "json", str(image), env=clashing_site)
    assert predicted.code == 0, predicted.stderr
    [record] = json.loads(predicted.stdout)
    assert set(record["probabilities"]) == {"common_nevus", "atypical_nevus", "melanoma"}  # the built-in head's classes
    checked = run_mvit("data", "check", "ph2", "--root", str(make_ph2(tmp_path / "PH2")), env=clashing_site)
    assert checked.code == 0, checked.stderr
