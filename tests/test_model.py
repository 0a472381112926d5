"""One backbone, many heads: any subset of heads from one backbone pass."""

import pytest
import torch

from mvit.errors import UnknownHeadError
from mvit.core.heads import HeadInfo
from mvit.errors import MvitError


def count_backbone_passes(model):
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_all_heads_come_from_one_backbone_pass(model):
    calls = count_backbone_passes(model)
    images = torch.randn(5, 3, 32, 32)
    logits = model(images)
    assert len(calls) == 1
    assert {name: out.shape for name, out in logits.items()} == {"mel": (5, 2), "three": (5, 3)}


def test_a_subset_equals_the_heads_computed_alone(model):
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(images, heads=["mel", "three"])
        alone = model(images, heads="three")
    assert list(alone) == ["three"]
    torch.testing.assert_close(together["three"], alone["three"])


def test_unknown_head_lists_the_heads_the_model_has(model):
    with pytest.raises(UnknownHeadError, match=r"no head 'ph2' \(it has: mel, three\).*mvit train"):
        model(torch.randn(1, 3, 32, 32), heads="ph2")


def test_add_and_remove_heads(model):
    model.add_head(HeadInfo(name="extra", dataset="toy", classes=("x", "y", "z", "w")))
    assert model(torch.randn(2, 3, 32, 32), heads="extra")["extra"].shape == (2, 4)
    assert "head.extra" in model.parameter_groups()
    model.remove_head("extra")
    assert "extra" not in model.heads and "extra" not in model.classifiers
    with pytest.raises(MvitError, match="already has a head"):
        model.add_head(HeadInfo(name="mel", dataset="toy", classes=("a", "b")))


def test_parameter_groups_name_backbone_parts_and_heads(model):
    groups = model.parameter_groups()
    assert list(groups) == ["patch_embed", "position", "block.0", "block.1", "final_norm", "head.mel", "head.three"]
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))


def test_head_facts_are_validated_when_updated(model):
    model.update_head("mel", threshold=0.42, temperature=1.7, metrics={"roc_auc": 0.9})
    assert model.heads["mel"].threshold == 0.42
    with pytest.raises(ValueError):
        model.update_head("mel", temperature=-1)
