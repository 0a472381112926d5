"""`mvit plugins new NAME`: a working dataset plugin package to start from.

It writes what a plugin author needs and nothing else: a pyproject with the `mvit` entry point, a
module with a loader for a simple layout (a labels CSV beside an images folder), both hooks with a
multi-class head and a melanoma head, a test that generates a tiny dataset and checks the plugin
against mvit's own checks, and a README saying what to change. The author edits the loader for
their dataset's real layout; everything else already fits the contract in docs/plugins.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from mvit.errors import ConfigError
from mvit.registry.specs import is_valid_name

TEMPLATE = Path(__file__).with_name("plugin_template")  # the package, with $name and $module to fill in
MODULE_FOLDER = "MODULE"  # the folder named after the module
SUFFIX = ".tmpl"  # on Python files, so that installing mvit does not compile them


def module_name(name: str) -> str:
    return "mvit_" + re.sub(r"[-]", "_", name)


def write_plugin(name: str, folder: Path) -> Path:
    """Write the package `mvit-NAME` into `folder` (which must not exist or be empty); returns it."""
    if not is_valid_name(name):
        raise ConfigError(
            f"{name!r} cannot name a dataset: use lower-case letters, digits, '-' and '_', starting with a letter"
        )
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder; choose another --output")
    module = module_name(name)
    values = {"name": name, "module": module}
    for template in sorted(p for p in TEMPLATE.rglob("*") if p.is_file()):
        parts = [module if part == MODULE_FOLDER else part for part in template.relative_to(TEMPLATE).parts]
        path = folder.joinpath(*parts)
        path = path.with_name(path.name.removesuffix(SUFFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template.read_text()).substitute(values))
    return folder
