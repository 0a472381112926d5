"""Decode any image a user may hand over into an 8-bit RGB PIL image, or fail with one sentence.

Dermoscopy exports come as JPEG, PNG, BMP and TIFF, sometimes 16-bit, CMYK or with transparency;
each is turned into plain RGB the same way at training and prediction time.
"""

from __future__ import annotations

import glob
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mvit.errors import ImageError, ImageTooLarge
from mvit.registry.image_paths import image_files, is_image

# Images above this many pixels are refused: a 600 MP "image" is a decompression bomb, not a lesion.
MAX_PIXELS = 178_956_970  # Pillow's own default limit
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (e.g. read from standard input), named for messages."""

    data: bytes
    name: str = "standard input"


def load_image(path: Union[str, Path]) -> Image.Image:
    """Open, fully decode and convert an image file to RGB."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path} is empty (0 bytes)")
        return _decode(path, str(path))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{path} cannot be read (permission denied)") from None
    except OSError as error:  # a symbolic link that loops, a name too long, a failing disk: this file only
        raise ImageError(f"{path} cannot be read ({(error.strerror or str(error)).lower()})") from None


def decode_image(image: EncodedImage, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode and convert an image held in memory to RGB, or fail with one sentence naming it.
    max_pixels: refuse (`ImageTooLarge`) an image with more pixels, before decoding it."""
    if not image.data:
        raise ImageError(f"{image.name} is empty (0 bytes)")
    return _decode(io.BytesIO(image.data), image.name, max_pixels)


def decode_problem(image: EncodedImage) -> Optional[str]:
    """Why these bytes would not decode (one sentence naming `image.name`), or None when they would;
    cheaper than decoding them (`mvit data check` runs it on every image of a dataset)."""
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            opened.verify()  # structure and checksums, where the format has them
        _decode(io.BytesIO(image.data), image.name, draft=True)
    except ImageError as error:
        return str(error)
    except UnidentifiedImageError:  # from the first open, before `_decode` would have said it
        return str(_not_an_image(image.name))
    except Exception as error:  # noqa: BLE001 - verify() raises many types for a bad file
        return f"{image.name} is damaged or incomplete: Pillow could not read it ({_pillow_words(error)})"
    return None


def _decode(source: Union[Path, BinaryIO], name: str, max_pixels: int = MAX_PIXELS, *, draft: bool = False) -> Image.Image:
    """Open, fully decode and convert a file or stream to RGB; Pillow's failures become one sentence.
    draft: decode a JPEG at 1/8 of its size, which still reads every byte (so truncation shows) at a
    fraction of the cost; for checking, not for use."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # reads the header only: the size is known before decoding
                if image.width * image.height > max_pixels:
                    raise ImageTooLarge(
                        f"{name} is {image.width:,} x {image.height:,} pixels, over the limit of {max_pixels:,} pixels"
                    )
                if draft:
                    image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))
                image.load()  # decode now, so a truncated file fails here and not later
                return to_rgb(ImageOps.exif_transpose(image))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # the caller names these for a path
    except UnidentifiedImageError:
        raise _not_an_image(name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{name} is too large to decode safely (over {min(max_pixels, MAX_PIXELS):,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's decoders report damage in these types
        # Pillow's own words name the symptom, not always the cause ("Truncated File Read" for a bad
        # chunk in a whole file), so they are quoted as Pillow's
        raise ImageError(f"{name} is damaged or incomplete: Pillow could not decode it ({_pillow_words(error)})") from None


def _not_an_image(name: str) -> ImageError:
    return ImageError(f"{name} is not an image file mvit can read (JPEG, PNG, BMP, TIFF ...)")


# what Pillow writes for the stream it read from an upload or a pipe: `<_io.BytesIO object at 0x7f...>`
_PYTHON_OBJECT = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")


def _pillow_words(error: Exception) -> str:
    """Pillow's message for `error`, less any Python object it names: the sentence names the file
    already, and a memory address tells a user nothing."""
    return _PYTHON_OBJECT.sub("", str(error)).strip() or type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparent pixels become black, as dermoscope vignettes are."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the real range to 0..255 instead of clipping it
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        values = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(values, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def as_rgb_image(value) -> Image.Image:
    """A path, PIL image, (H, W[, C]) numpy array, (C, H, W) tensor in [0, 1] or 0..255, or an
    `EncodedImage` (a file's bytes) -> RGB image."""
    if isinstance(value, (str, Path)):
        return load_image(value)
    if isinstance(value, EncodedImage):
        return decode_image(value)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, np.ndarray):
        return _array_to_rgb(value)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.ndim != 3 or value.shape[0] not in (1, 3, 4):
            raise ImageError(f"an image tensor must be (C, H, W) with 1, 3 or 4 channels, got {tuple(value.shape)}")
        return _array_to_rgb(value.detach().cpu().permute(1, 2, 0).numpy())
    raise ImageError(f"cannot read an image from a {type(value).__name__}; pass a path, PIL image, array or tensor")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype.kind == "f":
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array / 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def find_image_files(arguments: Iterable[Union[str, Path]]) -> list[Path]:
    """The files named on a command line, in order, each once: a file as given, a folder's image
    files (recursively, sorted), a glob's matching image files. A path that does not exist is kept,
    so that reading it reports it, next to the files that do exist."""

    found: list[Path] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            found += image_files(path)
        elif not path.exists() and any(char in str(argument) for char in "*?["):
            for match in sorted(glob.glob(str(path), recursive=True)):
                match = Path(match)
                found += image_files(match) if match.is_dir() else [match] * is_image(match)
        else:
            found.append(path)
    return list(dict.fromkeys(found))
