"""Hook specifications of the `mvit` plugin project.

A plugin module, registered under the `mvit` entry-point group, implements one or both hooks with
`@mvit.hookimpl` and calls `register` once per dataset or head it offers.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "mvit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register datasets: `register(DatasetSpec(...))`."""


@hookspec
def register_heads(register: Callable[..., None]) -> None:
    """Register classifier heads (class sets): `register(HeadSpec(...))`."""
