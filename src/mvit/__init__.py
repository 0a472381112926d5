"""mvit: classify dermoscopic skin-lesion images with one ViT backbone and many classifier heads.

The public API is small:

    model = mvit.load()                      # the bundled model, or mvit.load("model.safetensors")
    model.heads                              # what each head predicts
    model.predict("lesion.jpg", head="ph2")  # -> [Prediction(head, label, probabilities, ...)]
    mvit.list_heads(), mvit.list_datasets()  # what installed plugins offer

Names that need torch are imported on first use, so `mvit plugins` and `import mvit` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mvit.registry.hookspecs import hookimpl

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily: these pull in torch)
_LAZY = {
    "Model": "mvit.infer.model",
    "Prediction": "mvit.infer.prediction",
    "load": "mvit.infer.model",
    "save": "mvit.core.model_file",
    "create_backbone": "mvit.core.weights",
    "VisionTransformer": "mvit.core.vit",
    "list_heads": "mvit.registry.manager",
    "list_datasets": "mvit.registry.manager",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mvit' has no attribute {name!r}")
