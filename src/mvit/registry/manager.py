"""The registry of this process: loaded from the installed plugins on first use (`loading.py`),
replaced for a block by `temporary_plugins`, and the look-ups the rest of mvit calls."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from mvit.registry.catalog import Registry
from mvit.registry.loading import build_registry
from mvit.registry.specs import DatasetSpec, HeadSpec

_current: Optional[Registry] = None


def registry() -> Registry:
    """The registry of this process, built on first use from the installed plugins."""
    global _current
    if _current is None:
        _current = build_registry()
    return _current


@contextlib.contextmanager
def temporary_plugins(*plugins: Any, entry_points: bool = True) -> Iterator[Registry]:
    """Make `plugins` (in-process hook implementations) visible to every look-up inside the block.

        with temporary_plugins(MyTestPlugin()):
            mvit.registry.manager.get_head("my-head")
    """
    global _current
    saved = _current
    _current = build_registry(plugins, entry_points=entry_points)
    try:
        yield _current
    finally:
        _current = saved


def reset() -> None:
    """Forget the loaded plugins, so the next look-up reloads them (after installing one, say)."""
    global _current
    _current = None


def get_dataset(name: str) -> DatasetSpec:
    return registry().get_dataset(name)


def get_head(name: str) -> HeadSpec:
    return registry().get_head(name)


def list_datasets() -> list[DatasetSpec]:
    return sorted(registry().datasets.values(), key=lambda spec: spec.name)


def list_heads() -> list[HeadSpec]:
    return sorted(registry().heads.values(), key=lambda spec: spec.name)
