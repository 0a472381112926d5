"""The backbone written here matches timm's DeiT exactly when given the same weights."""

import pytest
import timm
import torch

from mvit.core.vit import NAMED_CONFIGS, VisionTransformer, ViTConfig, named_config
from mvit.core.weights import export_timm_state_dict, load_timm_state_dict
from mvit.errors import ConfigError


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_forward_features_match_timm(name):
    reference = timm.create_model(name, pretrained=False).eval()
    ours = VisionTransformer(named_config(name)).eval()
    loaded = load_timm_state_dict(ours, reference.state_dict())
    assert loaded == len(ours.state_dict())  # every backbone tensor came from the checkpoint

    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(images)
        tokens = ours.forward_features(images)
        pooled = ours(images)
    assert tokens.shape == (2, 197, NAMED_CONFIGS[name].width)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_export_loads_into_timm_strictly(name):
    ours = VisionTransformer(named_config(name)).eval()
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    reference.load_state_dict(export_timm_state_dict(ours), strict=True)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(images), ours.forward_features(images), atol=1e-5, rtol=1e-5)


def test_attention_path_matches_fast_path_and_returns_probabilities():
    config = ViTConfig(image_size=32, patch_size=8, width=48, depth=3, num_heads=4)
    model = VisionTransformer(config).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model.forward_features(images)
        explained, attentions = model.forward_with_attention(images)
    torch.testing.assert_close(explained, fast, atol=1e-5, rtol=1e-5)
    assert len(attentions) == 3
    for probabilities in attentions:
        assert probabilities.shape == (3, 4, 17, 17)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 4, 17))


def test_other_image_sizes_interpolate_position_embeddings():
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=48, depth=2, num_heads=4)).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 48, 48))
    assert tokens.shape == (2, 1 + 36, 48)


def test_weights_at_one_size_load_into_another():
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    ours = VisionTransformer(named_config("deit_tiny_patch16_224", image_size=160)).eval()
    load_timm_state_dict(ours, reference.state_dict())
    assert ours.position_embedding.shape == (1, 1 + 10 * 10, 192)
    torch.testing.assert_close(ours.class_token, reference.cls_token)


def test_drop_path_and_dropout_only_act_in_training():
    config = ViTConfig(image_size=32, patch_size=8, width=48, depth=2, num_heads=4, dropout=0.5, drop_path=0.5)
    model = VisionTransformer(config)
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


def test_parameter_groups_cover_every_parameter_once():
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=48, depth=3, num_heads=4))
    groups = model.parameter_groups()
    assert list(groups) == ["patch_embed", "position", "block.0", "block.1", "block.2", "final_norm"]
    grouped = [id(p) for params in groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize(
    "settings", [dict(width=50, num_heads=4), dict(image_size=30, patch_size=8), dict(depth=0)]
)
def test_invalid_configurations_are_refused(settings):
    with pytest.raises(ValueError):
        ViTConfig(**settings)


def test_unknown_named_backbone_is_a_clear_error():
    with pytest.raises(ConfigError, match="deit_tiny_patch16_224"):
        named_config("deit_huge")
    with pytest.raises(ConfigError, match="not divisible"):
        named_config("deit_tiny_patch16_224", num_heads=5)


def test_in_place_inference_path_equals_the_autograd_path():
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=48, depth=3, num_heads=4)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens, pooled = model.forward_features(images), model(images)
    assert torch.equal(tokens, model.forward_features(images).detach())  # grad enabled: no in-place updates
    assert torch.equal(pooled, model(images).detach())
    model(images).sum().backward()  # and the autograd path still differentiates
    assert model.blocks[0].mlp.fc_in.weight.grad is not None


def test_one_pass_gives_every_intermediate_the_named_forwards_give():
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=48, depth=3, num_heads=4)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model(images)
        tokens = model.forward_features(images)
        tapped = model.forward_with_tap(images, 2)
        found = model.forward_intermediates(images, tap=2, all_tokens=True, attention=True, in_place=False)
        quick = model.forward_intermediates(images, tap=1)  # the last block on the class token alone
    assert quick.tokens is None and quick.attentions == [] and quick.pooled.shape == (2, 48)
    assert torch.equal(tapped[0], pooled)
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)  # a class-token-only last block
    torch.testing.assert_close(found.tokens, tokens, atol=1e-5, rtol=1e-5)  # the explicit softmax
    torch.testing.assert_close(found.tap, tapped[1], atol=1e-5, rtol=1e-5)
    assert len(found.attentions) == 3 and found.attentions[0].shape == (2, 4, 17, 17)
    with pytest.raises(ValueError, match="after block 1 to 2"):
        model.forward_intermediates(images, tap=3)  # the last block computes the class token only
