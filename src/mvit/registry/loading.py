"""Builds a registry from the installed plugins.

Every plugin, the built-ins included, comes in through the `mvit` entry-point group. A plugin that
fails to import, fails inside a hook or registers an invalid spec is skipped and kept as a warning,
so one broken third-party package never takes the others down. Two plugins claiming one name is an
error naming both: mvit cannot guess which one the user meant.

    MVIT_LOAD_PLUGINS=ph2,mvit-isic2019 mvit plugins   # only these (entry-point or distribution names)
    MVIT_LOAD_PLUGINS= mvit plugins                   # none at all
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Any, Iterable, Optional

import pluggy
from pydantic import ValidationError

from mvit.errors import PluginError
from mvit.registry import hookspecs
from mvit.registry.catalog import PluginInfo, PluginWarning, Registry
from mvit.registry.specs import DatasetSpec, HeadSpec

ENV_LOAD_PLUGINS = "MVIT_LOAD_PLUGINS"
IN_PROCESS = "(in-process)"  # the distribution shown for plugin objects registered by tests


def build_registry(extra_plugins: Iterable[Any] = (), *, entry_points: bool = True) -> Registry:
    """Load the entry-point plugins (as `MVIT_LOAD_PLUGINS` allows) plus `extra_plugins`.

    `extra_plugins` are modules, classes or objects with `@mvit.hookimpl` functions, registered in
    this process only: how tests add a plugin without installing a package.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    warnings: list[PluginWarning] = []
    if entry_points:
        _load_entry_points(pm, infos, warnings)
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if _register(pm, plugin, name, warnings, IN_PROCESS):
            infos[name] = PluginInfo(name=name, distribution=IN_PROCESS, version="")
    return _collect(pm, infos, warnings)


def _selected(entry_point: importlib.metadata.EntryPoint, wanted: Optional[set[str]]) -> bool:
    if wanted is None:
        return True
    return _normalize(entry_point.name) in wanted or _normalize(_dist_name(entry_point)) in wanted


def _normalize(name: str) -> str:
    # distribution names compare as in PEP 503: case and runs of -_. do not matter
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(entry_point: importlib.metadata.EntryPoint) -> str:
    return entry_point.dist.metadata["Name"] if entry_point.dist else "(unknown)"


def _wanted_from_env() -> Optional[set[str]]:
    value = os.environ.get(ENV_LOAD_PLUGINS)
    if value is None:
        return None
    return {_normalize(part.strip()) for part in value.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager, infos: dict[str, PluginInfo], warnings: list[PluginWarning]) -> None:
    wanted = _wanted_from_env()
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        dist = _dist_name(entry_point)
        earlier = seen.get(entry_point.name)
        if earlier is not None:
            if _dist_name(earlier) == dist:
                continue  # the same distribution found twice on sys.path
            raise PluginError(
                f"the plugin name {entry_point.name!r} is claimed by two distributions, "
                f"{_dist_name(earlier)!r} and {dist!r}; uninstall one of them"
            )
        seen[entry_point.name] = entry_point
    matched: set[str] = set()
    for name, entry_point in sorted(seen.items()):
        if not _selected(entry_point, wanted):
            continue
        matched |= {_normalize(name), _normalize(_dist_name(entry_point))}
        dist, version = _dist_name(entry_point), entry_point.dist.version if entry_point.dist else ""
        try:
            # pluggy imports the module and registers it; one entry point at a time, so a plugin
            # that fails to import is skipped alone instead of stopping the loop
            pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=name)
        except Exception as error:  # noqa: BLE001 - any failure in third-party code skips that plugin
            warnings.append(PluginWarning(name, dist, f"could not be loaded: {_one_line(error)}"))
            continue
        if pm.has_plugin(name) and _pending_ok(pm, name, warnings, dist):
            infos[name] = PluginInfo(name=name, distribution=dist, version=version)
    for name in sorted((wanted or set()) - matched):
        warnings.append(
            PluginWarning(name, "", f"{ENV_LOAD_PLUGINS} names {name!r}, which no installed mvit plugin provides")
        )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, warnings: list[PluginWarning], dist: str) -> bool:
    try:
        pm.register(plugin, name=name)
    except Exception as error:  # noqa: BLE001 - pluggy's validation errors and duplicate names alike
        warnings.append(PluginWarning(name, dist, f"could not be registered: {_one_line(error)}"))
        return False
    return _pending_ok(pm, name, warnings, dist)


def _pending_ok(pm: pluggy.PluginManager, name: str, warnings: list[PluginWarning], dist: str) -> bool:
    """Catch a misspelled hook name now; otherwise pluggy would never call it and say nothing."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        pm.unregister(name=name)
        warnings.append(PluginWarning(name, dist, f"has an unknown hook: {_one_line(error)}"))
        return False
    return True


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"invalid {error.title}: {where + ': ' if where else ''}{first['msg']}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---- calling the hooks -------------------------------------------------------------------------


def _call_hook(pm: pluggy.PluginManager, hook_name: str, spec_type: type, warnings: list[PluginWarning],
               infos: dict[str, PluginInfo]) -> dict[str, list[Any]]:
    """Call one hook plugin by plugin, so a failure is pinned to the plugin that raised it."""
    registered: dict[str, list[Any]] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if impl.plugin_name not in infos:
            continue
        specs: list[Any] = []

        def register(spec: Any) -> None:
            if not isinstance(spec, spec_type):
                raise TypeError(f"{hook_name} expects {spec_type.__name__} objects, got {type(spec).__name__}")
            specs.append(spec)

        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as error:  # noqa: BLE001 - a broken plugin is reported and skipped
            info = infos.pop(impl.plugin_name)
            warnings.append(PluginWarning(info.name, info.distribution, f"failed in {hook_name}: {_one_line(error)}"))
            continue
        registered[impl.plugin_name] = specs
    return registered


def _collect(pm: pluggy.PluginManager, infos: dict[str, PluginInfo], warnings: list[PluginWarning]) -> Registry:
    datasets = _call_hook(pm, "register_datasets", DatasetSpec, warnings, infos)
    heads = _call_hook(pm, "register_heads", HeadSpec, warnings, infos)
    # a plugin that failed in its second hook must not keep what it registered in the first
    datasets = {name: specs for name, specs in datasets.items() if name in infos}
    registry = Registry(warnings=warnings)
    for kind, by_plugin, target in (("dataset", datasets, registry.datasets), ("head", heads, registry.heads)):
        for plugin_name, specs in by_plugin.items():
            for spec in specs:
                _claim(registry, kind, spec.name, infos[plugin_name])
                target[spec.name] = spec
    for name, head in list(registry.heads.items()):
        problem = _head_problem(head, registry.datasets)
        if problem:
            info = registry.provider.pop(f"head:{name}")
            del registry.heads[name]
            warnings.append(PluginWarning(info.name, info.distribution, f"head {name!r} was skipped: {problem}"))
    for name, info in infos.items():
        registry.plugins[name] = PluginInfo(
            name=info.name,
            distribution=info.distribution,
            version=info.version,
            datasets=tuple(sorted(d for d in registry.datasets if registry.provider[f"dataset:{d}"].name == name)),
            heads=tuple(sorted(h for h in registry.heads if registry.provider[f"head:{h}"].name == name)),
        )
    return registry


def _claim(registry: Registry, kind: str, name: str, info: PluginInfo) -> None:
    key = f"{kind}:{name}"
    other = registry.provider.get(key)
    if other is not None:
        raise PluginError(
            f"the {kind} name {name!r} is registered by both plugin {other.name!r} ({other.distribution}) "
            f"and plugin {info.name!r} ({info.distribution}); uninstall one of them or choose with "
            f"{ENV_LOAD_PLUGINS}"
        )
    registry.provider[key] = info


def _head_problem(head: HeadSpec, datasets: dict[str, DatasetSpec]) -> str:
    """Why a head cannot be used with its dataset, or "" when it can."""
    dataset = datasets.get(head.dataset)
    if dataset is None:
        return f"its dataset {head.dataset!r} is not registered by any loaded plugin"
    stray = sorted(set(head.label_map) - set(dataset.labels))
    if stray:
        return f"its label_map names labels {stray} that dataset {dataset.name!r} does not have"
    # every dataset label must be a class or mapped (possibly to None): an unmapped label is a typo,
    # not a silent exclusion
    unmapped = sorted(label for label in dataset.labels if label not in head.label_map and label not in head.classes)
    if unmapped:
        return f"dataset {dataset.name!r} labels {unmapped} are neither classes of the head nor in its label_map"
    return ""
