"""Every third-party package mvit imports is a declared dependency of the distribution."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules(package: Path) -> set[str]:
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"mvit", "__future__"}


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # an optional extra counts (e.g. `mvit[onnx]`): the module importing it says how to install it
    extras = [line for name, lines in project.get("optional-dependencies", {}).items() if name != "dev" for line in lines]
    return {normalised(Requirement(line).name) for line in [*project["dependencies"], *extras]}


def normalised(name: str) -> str:
    """A distribution's name as PyPI compares them: `FastAPI_Offline` is `fastapi-offline`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    providers = importlib.metadata.packages_distributions()  # top-level module -> distributions
    declared = declared_distributions()
    undeclared = {
        module: providers.get(module, ["(not installed)"])
        for module in sorted(imported_top_level_modules(ROOT / "src" / "mvit"))
        if not {normalised(name) for name in providers.get(module, [])} & declared
    }
    assert undeclared == {}
