"""Builds a registry from the installed plugins.

Every plugin, the built-ins included, comes in through the `mvit` entry-point group. A plugin that
fails to import, fails inside a hook or registers an invalid spec is skipped and kept as a warning,
so one broken third-party package never takes the others down. Two plugins claiming one name is an
error naming both: mvit cannot guess which one the user meant.

    MVIT_LOAD_PLUGINS=ph2,mvit-isic2019 mvit plugins   # only these (entry-point or distribution names)
    MVIT_LOAD_PLUGINS= mvit plugins                   # none at all
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import traceback
from typing import Any, Iterable, Optional

import pluggy
from pydantic import ValidationError

from mvit.registry import hookspecs
from mvit.registry.catalog import PluginInfo, PluginWarning, Registry
from mvit.registry.specs import DatasetSpec, HeadSpec

ENV_LOAD_PLUGINS = "MVIT_LOAD_PLUGINS"
IN_PROCESS = "(in-process)"  # the distribution shown for plugin objects registered by tests
BUILT_IN = "mvit"  # the distribution of the built-in plugins: they win every name clash
HOOKS = ("register_datasets", "register_heads")


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
        name = plugin_name(plugin)
        if _register(pm, plugin, name, warnings, IN_PROCESS):
            infos[name] = PluginInfo(name=name, distribution=IN_PROCESS, version="")
    return _collect(pm, infos, warnings)


def plugin_name(plugin: Any) -> str:
    """The name an in-process plugin is registered under: a module's name, an object's own
    `__name__` where it sets one, else its class's."""
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _skip(warnings: list[PluginWarning], name: str, dist: str, message: str, error: Optional[BaseException] = None,
          **options: Any) -> None:
    """Record a skipped plugin (or head); `error`, raised by the plugin's own code, keeps its traceback."""
    trace = "".join(traceback.format_exception(error)) if error is not None else None
    warnings.append(PluginWarning(name, dist, message, traceback=trace, **options))


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
    # the built-in plugins first, so a third-party plugin can never take their names
    found = sorted(importlib.metadata.entry_points(group=hookspecs.PROJECT), key=lambda ep: _dist_name(ep) != BUILT_IN)
    for entry_point in found:
        dist = _dist_name(entry_point)
        earlier = seen.get(entry_point.name)
        if earlier is not None:
            if _dist_name(earlier) != dist:  # else the same distribution found twice on sys.path
                _skip(warnings, entry_point.name, dist, level="error", message=(
                    f"the plugin name {entry_point.name!r} is already taken by distribution {_dist_name(earlier)!r}; "
                    f"rename the entry point in {dist!r}, or uninstall one of them"))
            continue
        seen[entry_point.name] = entry_point
    matched: set[str] = set()
    for name, entry_point in sorted(seen.items(), key=lambda item: (_dist_name(item[1]) != BUILT_IN, item[0])):
        if not _selected(entry_point, wanted):
            continue
        matched |= {_normalize(name), _normalize(_dist_name(entry_point))}
        dist, version = _dist_name(entry_point), entry_point.dist.version if entry_point.dist else ""
        try:
            # this entry point itself, one at a time: pluggy's loader would import every entry
            # point of that name, a skipped clashing one included, and a plugin that fails to
            # import must be skipped alone instead of stopping the loop
            plugin = entry_point.load()
        except Exception as error:  # noqa: BLE001 - any failure in third-party code skips that plugin
            _skip(warnings, name, dist, f"could not be loaded: {_one_line(error)}", error)
            continue
        if _register(pm, plugin, name, warnings, dist):
            infos[name] = PluginInfo(name=name, distribution=dist, version=version)
    for name in sorted((wanted or set()) - matched):
        warnings.append(
            PluginWarning(name, "", f"{ENV_LOAD_PLUGINS} names {name!r}, which no installed mvit plugin provides")
        )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, warnings: list[PluginWarning], dist: str) -> bool:
    try:
        pm.register(plugin, name=name)
    except Exception as error:  # noqa: BLE001 - pluggy's validation errors and duplicate names alike
        _skip(warnings, name, dist, f"could not be registered: {_one_line(error)}", error)
        return False
    return _pending_ok(pm, name, warnings, dist)


def _pending_ok(pm: pluggy.PluginManager, name: str, warnings: list[PluginWarning], dist: str) -> bool:
    """Catch a misspelled hook name now; otherwise pluggy would never call it and say nothing."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        pm.unregister(name=name)
        typo = re.search(r"unknown hook '(\w+)'", str(error))
        near = difflib.get_close_matches(typo.group(1), HOOKS, n=1) if typo else []
        hint = f"; did you mean {near[0]!r}?" if near else f"; mvit's hooks are {', '.join(HOOKS)}"
        _skip(warnings, name, dist, f"has an unknown hook: {_one_line(error)}{hint}")
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
               infos: dict[str, PluginInfo], skipped: dict[str, str]) -> dict[str, list[Any]]:
    """Call one hook plugin by plugin, so a failure is pinned to the plugin that raised it."""
    registered: dict[str, list[Any]] = {}
    kind = "dataset" if spec_type is DatasetSpec else "head"
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
            reason = f"plugin {info.name!r} failed in {hook_name}: {_one_line(error)}"
            skipped.update({f"{kind}:{spec.name}": reason for spec in specs})
            _skip(warnings, info.name, info.distribution, f"failed in {hook_name}: {_one_line(error)}", error)
            continue
        registered[impl.plugin_name] = specs
    return registered


def _collect(pm: pluggy.PluginManager, infos: dict[str, PluginInfo], warnings: list[PluginWarning]) -> Registry:
    registry = Registry(warnings=warnings)
    skipped = registry.skipped
    datasets = _call_hook(pm, "register_datasets", DatasetSpec, warnings, infos, skipped)
    heads = _call_hook(pm, "register_heads", HeadSpec, warnings, infos, skipped)
    # a plugin that failed in its second hook must not keep what it registered in the first
    for plugin_name in set(datasets) - set(infos):
        skipped.update({f"dataset:{spec.name}": f"its plugin {plugin_name!r} failed" for spec in datasets.pop(plugin_name)})
    # built-ins first: a newcomer that takes a name already registered is skipped whole, so its heads
    # can never attach to another plugin's dataset of the same name
    for plugin_name in sorted(infos, key=lambda name: infos[name].distribution != BUILT_IN):
        info = infos[plugin_name]
        offered = [("dataset", spec) for spec in datasets.get(plugin_name, [])] + [("head", spec) for spec in heads.get(plugin_name, [])]
        clash = _clash(registry, offered, info)
        if clash:
            del infos[plugin_name]
            reason = f"plugin {info.name!r} ({info.distribution}) {clash}"
            skipped.update({f"{kind}:{spec.name}": reason for kind, spec in offered if f"{kind}:{spec.name}" not in registry.provider})
            _skip(warnings, info.name, info.distribution, clash, level="error")
            continue
        for kind, spec in offered:
            registry.provider[f"{kind}:{spec.name}"] = info
            (registry.datasets if kind == "dataset" else registry.heads)[spec.name] = spec
    for name, head in list(registry.heads.items()):
        problem = _head_problem(head, registry.datasets)
        if problem:
            info = registry.provider.pop(f"head:{name}")
            del registry.heads[name]
            skipped[f"head:{name}"] = problem
            registry.lost.setdefault(head.dataset, {})[name] = f"{problem} (plugin {info.name!r})"
            _skip(warnings, info.name, info.distribution, problem, skipped=f"head {name!r}")
    for warning in warnings:
        if warning.skipped == "plugin":
            skipped.setdefault(f"plugin:{warning.plugin}", f"plugin {warning.plugin!r} {warning.message}")
    for name, info in infos.items():
        registry.plugins[name] = PluginInfo(
            name=info.name,
            distribution=info.distribution,
            version=info.version,
            datasets=tuple(sorted(d for d in registry.datasets if registry.provider[f"dataset:{d}"].name == name)),
            heads=tuple(sorted(h for h in registry.heads if registry.provider[f"head:{h}"].name == name)),
        )
    return registry


def _clash(registry: Registry, offered: list[tuple[str, Any]], info: PluginInfo) -> str:
    """Why a plugin cannot take the names it offers, or "" when it can."""
    names = [f"{kind}:{spec.name}" for kind, spec in offered]
    for key in names:
        kind, name = key.split(":", 1)
        other = registry.provider.get(key)
        if other is not None:
            return (
                f"registers the {kind} name {name!r}, which plugin {other.name!r} ({other.distribution}) already "
                f"registered; rename it in the plugin, or leave one of them out with {ENV_LOAD_PLUGINS}"
            )
        if names.count(key) > 1:
            return f"registers the {kind} name {name!r} twice"
    return ""


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
