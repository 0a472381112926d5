"""Classifier heads: a small MLP from the pooled backbone feature (B, D) to class logits (B, K)."""

from __future__ import annotations

from torch import Tensor, nn

from mvit.registry.specs import HeadConfig


class ClassifierHead(nn.Module):
    """LayerNorm-free MLP: [Dropout -> Linear -> GELU] per hidden size, then Dropout -> Linear."""

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig | None = None):
        super().__init__()
        self.config = config = config or HeadConfig()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in config.hidden:
            layers += [nn.Dropout(config.dropout), nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers += [nn.Dropout(config.dropout), nn.Linear(width, num_classes)]
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_features

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)  # (B, D) -> (B, K)
