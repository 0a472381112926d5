"""Which files are images: the suffixes mvit decodes, and a folder's image files. Part of the
contract, so a plugin's loader finds images the way mvit does."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, sorted: the default answer to "which images does it hold"."""
    return sorted(path for path in root.rglob("*") if path.is_file() and is_image(path))
