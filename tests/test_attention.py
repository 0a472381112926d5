"""Attention maps: batch equals single image, maps lie on the original image, the class-specific map."""

import numpy as np
import pytest
import torch

from mvit.infer.attention import _gradient_weighted, _rollout, attention_maps, crop_box
from mvit.core.preprocessing import Preprocessing
from mvit.errors import ConfigError, ImageError

KINDS = ("last_layer", "rollout", "per_head", "per_layer", "class_specific")


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (64, 48), (32, 32), (90, 120))]


def test_a_batch_gives_the_maps_of_each_image_alone(model):
    images = _images()
    batched = model.attention(images, head="three")
    for image, together in zip(images, batched):
        (alone,) = model.attention(image, head="three")
        assert together.target == alone.target
        for kind in KINDS:
            np.testing.assert_allclose(getattr(together, kind), getattr(alone, kind), atol=1e-6, err_msg=kind)


def test_maps_lie_on_the_original_image_inside_the_crop(model):
    (maps,) = model.attention(_images()[3], head="mel")  # 120 x 90
    depth, heads = model.backbone.config.depth, model.backbone.config.num_heads
    assert maps.rgb.shape == (90, 120, 3)
    assert maps.last_layer.shape == maps.rollout.shape == maps.class_specific.shape == (90, 120)
    assert maps.per_head.shape == (heads, 90, 120) and maps.per_layer.shape == (depth, 90, 120)
    left, top, right, bottom = maps.crop_box
    # the shorter side (90 px) is resized to round(32 / 0.9) = 36 px and 32 of them kept: 80 px, centred
    assert (right - left, bottom - top) == (80, 80)
    assert (left, top) == (20, 5)
    inside = np.zeros((90, 120), bool)
    inside[top:bottom, left:right] = True
    for kind in KINDS:
        value = getattr(maps, kind)
        assert (value[..., ~inside] == 0).all() and (value[..., inside] > 0).all(), kind
    np.testing.assert_allclose(maps.last_layer, maps.per_head.mean(0), atol=1e-6)
    np.testing.assert_allclose(maps.per_layer[-1], maps.last_layer, atol=1e-6)


def test_crop_box_follows_the_preprocessing():
    assert crop_box(200, 100, Preprocessing(image_size=32, resize="squash")) == (0, 0, 200, 100)
    left, top, right, bottom = crop_box(200, 100, Preprocessing(image_size=224, crop_fraction=0.875))
    assert (top, bottom) == pytest.approx((6.25, 93.75)) and right - left == pytest.approx(87.5)


def test_max_size_scales_maps_and_image_down(model):
    (maps,) = model.attention(_images()[3], max_size=60)
    assert maps.rgb.shape == (45, 60, 3) and maps.rollout.shape == (45, 60)
    assert maps.class_specific is None and maps.head is None  # no head: plain attention only


def test_rollout_of_one_layer_is_half_attention_half_identity():
    attention = torch.rand(2, 3, 5, 5).softmax(-1)  # (B, h, T, T)
    expected = 0.5 * attention.mean(1) + 0.5 * torch.eye(5)
    torch.testing.assert_close(_rollout([attention]), expected)
    torch.testing.assert_close(_rollout([attention, attention]), expected @ expected)


def test_gradient_weighting_keeps_only_positive_evidence():
    attention = torch.rand(1, 2, 4, 4).softmax(-1)
    torch.testing.assert_close(_gradient_weighted([attention], [-torch.ones_like(attention)]), torch.eye(4)[None])
    weighted = _gradient_weighted([attention], [torch.ones_like(attention)])
    torch.testing.assert_close(weighted, torch.eye(4) + attention.mean(1))


def test_the_class_specific_map_depends_on_the_class(model):
    image = _images()[0]
    for_a, for_b = (model.attention(image, head="three", target=name)[0] for name in ("a", "b"))
    assert (for_a.target, for_b.target) == ("a", "b")
    assert not np.allclose(for_a.class_specific, for_b.class_specific)
    np.testing.assert_allclose(for_a.last_layer, for_b.last_layer)  # plain attention ignores the class
    default = model.attention(image, head="three")[0]
    assert default.target == model.predict(image, head="three")[0].label


def test_bad_requests_fail_with_one_sentence(model, tmp_path):
    with pytest.raises(ConfigError, match="no class 'z'"):
        model.attention(_images()[0], head="three", target="z")
    with pytest.raises(ConfigError, match="needs a head"):
        attention_maps(model, _images()[0], target="a")
    with pytest.raises(ImageError, match="image 1:"):
        model.attention([_images()[0], np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ImageError, match="does not exist"):
        model.attention(tmp_path / "gone.jpg")
