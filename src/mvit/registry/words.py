"""Words for sentences: counts ("1 image", "2 images") and the name a mistyped one was meant to be."""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


def count(number: int, noun: str, plural: str = "") -> str:
    """`number` and `noun`, plural unless it is one: count(1, "label row") -> "1 label row"."""
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"


def nearest(name: str, known: Iterable[str]) -> Optional[str]:
    """The known name `name` most likely mistypes (`ph2mel` -> `ph2-mel`), or None when none is close."""
    near = difflib.get_close_matches(name, list(known), n=1)
    return near[0] if near else None
