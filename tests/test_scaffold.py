"""A plugin written by the scaffold installs with pip, passes its own tests and appears in mvit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clirun import run_mvit
from mvit.errors import ConfigError
from mvit.datasets.scaffold import write_plugin


def installed_and_tested(package, tmp_path) -> dict:
    """pip-install `package` into a folder of its own (the test venv stays as it was), run the
    package's own tests against it, and return `mvit plugins --format json` as it then answers."""
    site = tmp_path / "site"
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
    return json.loads(listed.stdout)


def listed_plugin(summary: dict, name: str) -> dict:
    plugin = next(p for p in summary["plugins"] if p["name"] == name)
    assert plugin["distribution"] == f"mvit-{name}"
    assert plugin["datasets"] == [name] and plugin["heads"] == [name, f"{name}-mel"]
    assert summary["warnings"] == []
    return plugin


@pytest.mark.slow
def test_the_scaffold_installs_passes_its_tests_and_appears_in_mvit_plugins(tmp_path):
    package = tmp_path / "mvit-derm-site"
    run = run_mvit("plugins", "new", "derm-site", "--output", str(package))
    assert run.code == 0, run.stderr
    assert (package / "src" / "mvit_derm_site" / "__init__.py").is_file()
    listed_plugin(installed_and_tested(package, tmp_path), "derm-site")


@pytest.mark.slow
def test_a_plugin_the_scaffold_wrote_before_the_engine_moved_still_installs_and_works(tmp_path):
    """tests/plugins_written_before holds the scaffold's output from before `mvit.datasets` existed:
    its loader imports `mvit.registry` and its tests `mvit.registry.check`."""
    package = shutil.copytree(Path(__file__).parent / "plugins_written_before" / "mvit-old-lesions", tmp_path / "old")
    assert "from mvit.registry.check import check_dataset" in (package / "tests" / "test_plugin.py").read_text()
    listed_plugin(installed_and_tested(package, tmp_path), "old-lesions")


def test_the_scaffold_writes_every_file_of_its_template_and_fills_every_blank(tmp_path):
    package = write_plugin("derm-site", tmp_path / "p")
    written = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert written == ["README.md", "pyproject.toml", "src/mvit_derm_site/__init__.py", "tests/test_plugin.py"]
    for path in package.rglob("*"):
        if path.is_file():
            assert "$" not in path.read_text().replace("$ ", ""), path


def test_the_scaffold_refuses_a_bad_name_or_a_folder_in_use(tmp_path):
    with pytest.raises(ConfigError, match="cannot name a dataset"):
        write_plugin("Derm Site", tmp_path / "a")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        write_plugin("derm", tmp_path / "used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
