"""Kept for plugins written before the dataset engine moved to `mvit.datasets`: their generated tests
import `check_dataset` from here. It is `mvit.datasets.check` now; this is the only module of the
contract that reaches above it, and only when the name is used."""

from __future__ import annotations

import warnings


def __getattr__(name: str):
    if name in ("check_dataset", "CheckReport"):
        warnings.warn("mvit.registry.check moved to mvit.datasets.check", DeprecationWarning, stacklevel=2)
        from mvit.datasets import check

        return getattr(check, name)
    raise AttributeError(f"module 'mvit.registry.check' has no attribute {name!r}")
