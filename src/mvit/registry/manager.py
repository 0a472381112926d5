"""The registry of this process: loaded from the installed plugins on first use (`loading.py`),
replaced for a block by `temporary_plugins`, grown by `add_plugins`, and the look-ups the rest of
mvit calls."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from mvit.registry.catalog import Registry
from mvit.registry.loading import build_registry, plugin_name
from mvit.registry.specs import DatasetSpec, HeadSpec

_current: Optional[Registry] = None
# what `_current` is built from: the in-process plugins, and whether the installed ones come too
_plugins: tuple[Any, ...] = ()
_entry_points = True


def registry() -> Registry:
    """The registry of this process, built on first use from the installed plugins."""
    global _current
    if _current is None:
        _current = build_registry(_plugins, entry_points=_entry_points)
    return _current


@contextlib.contextmanager
def temporary_plugins(*plugins: Any, entry_points: bool = True) -> Iterator[Registry]:
    """Make `plugins` (in-process hook implementations) visible to every look-up inside the block.

        with temporary_plugins(MyTestPlugin()):
            mvit.registry.manager.get_head("my-head")
    """
    global _current, _plugins, _entry_points
    saved = _current, _plugins, _entry_points
    _plugins, _entry_points = plugins, entry_points
    _current = build_registry(plugins, entry_points=entry_points)
    try:
        yield _current
    finally:
        _current, _plugins, _entry_points = saved


def add_plugins(*plugins: Any) -> Registry:
    """Add in-process plugins to the registry of this process, beside what it holds, until `reset`
    (or the end of a `temporary_plugins` block); a plugin of the same name as one added before
    replaces it. How a training config's own folders become datasets (`mvit.datasets.folder`):
    every process of a torchrun run adds them to its own registry."""
    global _current, _plugins
    names = {plugin_name(plugin) for plugin in plugins}
    _plugins = tuple(plugin for plugin in _plugins if plugin_name(plugin) not in names) + plugins
    # rebuilt whole, so the added plugins pass the checks any plugin does (names taken, heads' labels)
    _current = build_registry(_plugins, entry_points=_entry_points)
    return _current


def reset() -> None:
    """Forget the loaded and added plugins, so the next look-up reloads the installed ones (after
    installing one, say)."""
    global _current, _plugins, _entry_points
    _current, _plugins, _entry_points = None, (), True


def get_dataset(name: str) -> DatasetSpec:
    return registry().get_dataset(name)


def get_head(name: str) -> HeadSpec:
    return registry().get_head(name)


def list_datasets() -> list[DatasetSpec]:
    return sorted(registry().datasets.values(), key=lambda spec: spec.name)


def list_heads() -> list[HeadSpec]:
    return sorted(registry().heads.values(), key=lambda spec: spec.name)
