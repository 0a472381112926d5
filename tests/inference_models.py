"""Tiny models with heads that installed plugins declare, saved as real model files, for inference tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from conftest import TINY, tiny_model
from mvit.core import model_file
from mvit.core.heads import HeadInfo
from mvit.infer.model import Model
from mvit.registry import manager


def plugin_heads_model(seed: int = 0) -> Model:
    """The conftest tiny model plus the `dermmel` (binary) and `ham10000` (7 classes) heads."""
    model = tiny_model(seed)
    torch.manual_seed(seed + 1)
    for name in ("dermmel", "ham10000"):
        model.add_head(HeadInfo.from_spec(manager.get_head(name)))
    return model.eval()


def saved_model(folder: Path, *, provenance: Optional[dict] = None, seed: int = 0) -> Path:
    return model_file.save(plugin_heads_model(seed), folder / "model.safetensors", provenance=provenance)


assert TINY.image_size == 32  # the images the tests write are about that size
