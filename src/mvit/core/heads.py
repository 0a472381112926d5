"""Classifier heads: a small MLP from the pooled backbone feature (B, D) to class logits (B, K),
and `HeadInfo`, what a trained head predicts and how to read it."""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from mvit.registry.specs import NAME_PATTERN, HeadConfig, HeadSpec, check_class_set


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


class HeadInfo(BaseModel):
    """What a trained head predicts and how to read it. Stored in the model file.

    Immutable: `Model.update_head` is the one way to change a head's facts, and it validates them.
    Every model file's heads pass these validators on load, so a tampered file (a class listed
    twice, a positive class the head lacks, a non-finite threshold) is refused with one sentence
    instead of giving a wrong label.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    dataset: str
    classes: tuple[str, ...]
    positive: Optional[str] = None  # the class a binary head screens for
    config: HeadConfig = Field(default_factory=HeadConfig)
    # Binary heads: predict `positive` when its calibrated probability is at least this.
    threshold: Optional[float] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    threshold_target: Optional[str] = None  # how the threshold was chosen, e.g. "sensitivity >= 0.90 on valid"
    temperature: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # logits are divided by it before the softmax
    metrics: dict[str, float] = Field(default_factory=dict)  # measured on held-out data, when known
    description: str = ""
    # True when temperature and threshold were fitted for these very weights (training's last step);
    # False for a head whose operating point is a default or was inherited from another model
    calibrated: bool = False
    # a head fitted in closed form: its L2 penalty strength (chosen on validation loss), which `mvit adapt` reuses
    l2_strength: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _calibrated_in_older_files(cls, data: Any) -> Any:
        """Files written before `calibrated` existed: a chosen threshold or a fitted temperature was
        only ever stored by calibration."""
        if isinstance(data, dict) and "calibrated" not in data:
            fitted = data.get("threshold_target") is not None or data.get("temperature", 1.0) != 1.0
            data = {**data, "calibrated": fitted}
        return data

    @field_validator("metrics")
    @classmethod
    def _finite_metrics(cls, metrics: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
        if bad:
            raise ValueError(f"metrics must be finite numbers, got {', '.join(f'{n} = {metrics[n]}' for n in bad)}")
        return metrics

    @model_validator(mode="after")
    def _consistent(self) -> "HeadInfo":
        check_class_set(self.name, self.classes, self.positive)  # the rules of a plugin's HeadSpec
        return self

    @classmethod
    def from_spec(cls, spec: HeadSpec) -> "HeadInfo":
        return cls(
            name=spec.name,
            dataset=spec.dataset,
            classes=spec.classes,
            positive=spec.positive,
            config=spec.config,
            description=spec.description,
        )

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2 and self.positive is not None

    @property
    def positive_index(self) -> Optional[int]:
        """The output a binary head thresholds (its positive class's); None for any other head."""
        return self.classes.index(self.positive) if self.is_binary else None
