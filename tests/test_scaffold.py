"""A plugin written by the scaffold installs with pip, passes its own tests and appears in mvit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clirun import run_mvit
from mvit.errors import ConfigError
from mvit.registry.scaffold import write_plugin


@pytest.mark.slow
def test_the_scaffold_installs_passes_its_tests_and_appears_in_mvit_plugins(tmp_path):
    package = tmp_path / "mvit-derm-site"
    run = run_mvit("plugins", "new", "derm-site", "--output", str(package))
    assert run.code == 0, run.stderr
    assert (package / "src" / "mvit_derm_site" / "__init__.py").is_file()

    site = tmp_path / "site"  # a real pip install, into its own folder so the test venv stays as it was
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(package)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout

    listed = run_mvit("plugins", "--format", "json", env={"PYTHONPATH": str(site)})
    assert listed.code == 0, listed.stderr
    summary = json.loads(listed.stdout)
    plugin = next(p for p in summary["plugins"] if p["name"] == "derm-site")
    assert plugin["distribution"] == "mvit-derm-site"
    assert plugin["datasets"] == ["derm-site"] and plugin["heads"] == ["derm-site", "derm-site-mel"]
    assert summary["warnings"] == []


def test_the_scaffold_refuses_a_bad_name_or_a_folder_in_use(tmp_path):
    with pytest.raises(ConfigError, match="cannot name a dataset"):
        write_plugin("Derm Site", tmp_path / "a")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        write_plugin("derm", tmp_path / "used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
