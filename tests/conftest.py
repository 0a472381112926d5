"""Shared fixtures: small backbones and models that build in milliseconds."""

import os
from pathlib import Path

import pytest
import torch

from mvit.core.heads import HeadInfo
from mvit.infer.model import Model
from mvit.core.preprocessing import Preprocessing
from mvit.core.vit import VisionTransformer, ViTConfig
from mvit.registry.specs import HeadConfig

# packages kept as written (installed by their own tests), not test modules of mvit's suite
collect_ignore = ["plugins_written_before"]

# the real dermoscopic images (../shared/data beside the repository, or $MVIT_SHARED_DATA): never
# copied into the repository; the tests that read them skip where they are absent
SHARED_DATA = Path(os.environ.get("MVIT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

TINY = ViTConfig(image_size=32, patch_size=8, width=48, depth=2, num_heads=4)


def tiny_model(seed: int = 0) -> Model:
    """A two-block backbone at 32 px with a binary and a three-class head."""
    torch.manual_seed(seed)
    model = Model(VisionTransformer(TINY), Preprocessing(image_size=32))
    model.add_head(HeadInfo(name="mel", dataset="toy", classes=("melanoma", "other"), positive="melanoma", threshold=0.3))
    model.add_head(
        HeadInfo(name="three", dataset="toy", classes=("a", "b", "c"), config=HeadConfig(hidden=[16], dropout=0.1))
    )
    return model.eval()


@pytest.fixture
def model() -> Model:
    return tiny_model()
