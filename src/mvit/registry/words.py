"""Counts in sentences: "1 image", "2 images"."""

from __future__ import annotations


def count(number: int, noun: str, plural: str = "") -> str:
    """`number` and `noun`, plural unless it is one: count(1, "label row") -> "1 label row"."""
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"
