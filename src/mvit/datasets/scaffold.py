"""`mvit plugins new NAME`: a working dataset plugin package to start from.

It writes what a plugin author needs and nothing else: a pyproject with the `mvit` entry point, a
module with a loader for a simple layout (a labels CSV beside an images folder), both hooks with a
multi-class head and a melanoma head, a test that generates a tiny dataset and checks the plugin
against mvit's own checks, and a README saying what to change. The author edits the loader for
their dataset's real layout; everything else already fits the contract in docs/plugins.md.
`name_clash` says, before the package is installed, whether an installed plugin already holds its names.
"""

from __future__ import annotations

import importlib.util
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


def name_clash(name: str, folder: Path) -> str:
    """One sentence when installed plugins already hold a name the package written into `folder`
    registers (its plugin name, its dataset, its heads), else "". Installed, the package would clash:
    mvit skips one of two plugins claiming a name, and always the newcomer against a built-in."""
    from mvit.registry import manager
    from mvit.registry.loading import BUILT_IN, build_registry

    installed = manager.registry()
    # the names the package registers, from its own module rather than repeated here, so a change to
    # the template cannot leave this check behind
    offered = build_registry([_written_module(name, folder)], entry_points=False).provider
    taken: dict[str, list[str]] = {}  # the installed plugin -> our dataset and head names it holds
    for key in offered:
        if key in installed.provider:
            taken.setdefault(installed.provider[key].name, []).append(key)
    if name in installed.plugins:
        taken.setdefault(name, [])
    if not taken:
        return ""
    claims = []
    for plugin, keys in taken.items():
        dist = installed.plugins[plugin].distribution
        where = dist if dist.startswith("(") else f"({dist})"  # an in-process plugin's is "(in-process)" already
        owner = f"the built-in plugin {plugin!r}" if dist == BUILT_IN else f"the plugin {plugin!r} {where}"
        claims.append(f"{owner} already registers {_listed(keys)}" if keys
                      else f"{owner} already uses the plugin name {name!r}")
    built_in = any(installed.plugins[plugin].distribution == BUILT_IN for plugin in taken)
    outcome = ("once installed, this package would be skipped as a clash" if built_in
               else "with both installed, mvit would skip one of the two as a clash")
    return f"{' and '.join(claims)}, so {outcome}; choose another name"


def _written_module(name: str, folder: Path):
    """The plugin module of the package in `folder`, imported from its file without installing it."""
    path = Path(folder) / "src" / module_name(name) / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name(name), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listed(keys: list[str]) -> str:
    """["dataset:a", "head:a", "head:a-mel"] -> "the dataset 'a' and the heads 'a', 'a-mel'"."""
    names: dict[str, list[str]] = {}
    for key in keys:
        kind, _, item = key.partition(":")
        names.setdefault(kind, []).append(repr(item))
    return " and ".join(f"the {kind}{'s' if len(items) > 1 else ''} {', '.join(items)}" for kind, items in names.items())
