"""Image files of every awkward kind a user may hand `mvit predict`, written on the fly.

`AWKWARD` decode to RGB (with care); `BROKEN` cannot be decoded and must fail with one sentence.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_factory import truncate, write_image


def grayscale(path: Path) -> Path:
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (24, 1)), "L").save(path)
    return path


def rgba(path: Path) -> Path:
    array = np.zeros((24, 32, 4), dtype=np.uint8)
    array[..., 0] = 200  # red everywhere, opaque on the left half, fully transparent on the right
    array[:, :16, 3] = 255
    Image.fromarray(array, "RGBA").save(path)
    return path


def cmyk(path: Path) -> Path:
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(path, "JPEG")  # pure red in print colours
    return path


def sixteen_bit(path: Path) -> Path:
    Image.fromarray(np.full((24, 32), 65535, dtype=np.uint16)).save(path)  # 16-bit white, "I;16" PNG
    return path


def palette_transparent(path: Path) -> Path:
    image = Image.new("P", (32, 24), 0)  # every pixel green, and green is the transparent entry
    image.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    image.save(path, transparency=0)
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("these are not the pixels you are looking for\n")
    return path


def truncated_jpeg(path: Path) -> Path:
    return truncate(write_image(path, size=(64, 48)), keep=400)


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def decompression_bomb(path: Path, side: int = 20_000) -> Path:
    """A PNG of a few hundred bytes whose header claims side x side pixels (400 MP at the default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (side + 1) * 4)  # a few rows; the decoder never gets that far
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


AWKWARD = {
    "grey.png": grayscale,
    "rgba.png": rgba,
    "cmyk.jpg": cmyk,
    "sixteen.png": sixteen_bit,
    "palette.png": palette_transparent,
}

BROKEN = {
    "notes.jpg": not_an_image,
    "cut.jpg": truncated_jpeg,
    "empty.jpg": zero_bytes,
    "bomb.png": decompression_bomb,
}

# names that trip shells, globs, CSV writers and rich markup
ODD_NAMES = ["with space.jpg", "ünïcödé_病变.jpg", "[red]markup[/red].jpg", "comma,quote'.jpg", "-leading-dash.jpg"]
