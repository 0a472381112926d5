"""Decoding whatever a user hands over: awkward images become RGB, broken ones fail with one sentence."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from bad_images import AWKWARD, BROKEN, ODD_NAMES, cmyk, grayscale, palette_transparent, rgba, sixteen_bit
from datasets_factory import write_image
from mvit.data.images import as_rgb_image, find_image_files, load_image
from mvit.errors import ImageError


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_awkward_images_decode_to_8_bit_rgb(tmp_path, name):
    image = load_image(AWKWARD[name](tmp_path / name))
    assert image.mode == "RGB" and image.size == (32, 24)


def test_grayscale_keeps_its_values_in_every_channel(tmp_path):
    array = np.asarray(load_image(grayscale(tmp_path / "g.png")))
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert array[0, :, 0].tolist() == list(range(0, 256, 8))


def test_transparency_becomes_black(tmp_path):
    array = np.asarray(load_image(rgba(tmp_path / "a.png")))
    assert array[0, 0].tolist() == [200, 0, 0]  # opaque
    assert array[0, -1].tolist() == [0, 0, 0]  # transparent
    assert np.asarray(load_image(palette_transparent(tmp_path / "p.png")))[0, 0].tolist() == [0, 0, 0]


def test_cmyk_is_converted_to_rgb_colours(tmp_path):
    red, green, blue = np.asarray(load_image(cmyk(tmp_path / "c.jpg")))[12, 16].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    assert Image.open(sixteen_bit(tmp_path / "s.png")).mode.startswith("I")  # really a 16-bit file
    assert np.asarray(load_image(tmp_path / "s.png"))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "name, says",
    [("notes.jpg", "is not an image file"), ("cut.jpg", "damaged or incomplete"), ("empty.jpg", "is empty (0 bytes)"),
     ("bomb.png", "too large to decode safely")],
)
def test_broken_files_fail_with_one_sentence_naming_the_file(tmp_path, name, says):
    path = BROKEN[name](tmp_path / name)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert str(path) in message and says in message and "\n" not in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_unreadable_file(tmp_path):
    path = write_image(tmp_path / "locked.jpg")
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_file_names_load(tmp_path, name):
    assert load_image(write_image(tmp_path / name)).size == (32, 24)


# ---- in-memory images ------------------------------------------------------------------------------


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a,
        lambda a: a.astype(np.float32) / 255.0,
        lambda a: a.astype(np.uint16) * 257,
        lambda a: Image.fromarray(a),
        lambda a: torch.from_numpy(a).permute(2, 0, 1),
        lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255.0,
    ],
    ids=["uint8", "float01", "uint16", "pil", "tensor-uint8", "tensor-float01"],
)
def test_every_in_memory_type_gives_the_same_pixels(convert):
    pixels = _pixels()
    assert np.array_equal(np.asarray(as_rgb_image(convert(pixels))), pixels)


def test_single_channel_arrays_and_tensors_become_grey_rgb():
    grey = _pixels()[..., 0]
    for value in (grey, grey[..., None], torch.from_numpy(grey)[None]):
        array = np.asarray(as_rgb_image(value))
        assert array.shape == (24, 32, 3) and (array[..., 2] == grey).all()


@pytest.mark.parametrize("value", [np.zeros((2, 3, 4, 5)), np.zeros((4, 4, 2)), torch.zeros(2, 8, 8), 42, b"bytes"])
def test_unusable_values_fail_with_one_sentence(value):
    with pytest.raises(ImageError):
        as_rgb_image(value)


# ---- finding files on a command line ------------------------------------------------------------------


def test_find_image_files_expands_folders_and_globs_in_order(tmp_path):
    for name in ("b.jpg", "a.png", "sub/c.bmp", "readme.txt"):
        path = tmp_path / "dir" / name
        write_image(path) if name.endswith(("jpg", "png", "bmp")) else (path.write_text("x"))
    single = write_image(tmp_path / "one.jpg")
    found = find_image_files([single, tmp_path / "dir", str(tmp_path / "dir" / "*.jpg"), tmp_path / "gone.jpg"])
    assert found == [
        single,
        tmp_path / "dir" / "a.png",
        tmp_path / "dir" / "b.jpg",
        tmp_path / "dir" / "sub" / "c.bmp",
        tmp_path / "gone.jpg",  # kept, so that reading it reports it
    ]
    assert find_image_files([tmp_path / "dir" / "readme.txt"]) == [tmp_path / "dir" / "readme.txt"]  # named files are tried
    assert find_image_files([str(tmp_path / "*.gif")]) == []
