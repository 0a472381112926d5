"""What a head answers for an image, and how its probabilities become a decision.

`Prediction` is the record every interface returns (the API, the CLI's JSON and CSV); a binary
head decides with its operating threshold, any other head by its most probable class, and the
logits are calibrated by the head's temperature first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from torch import Tensor

from mvit.errors import ConfigError
from mvit.core.heads import HeadInfo
from mvit.registry.specs import RESERVED_CLASS

UNKNOWN = RESERVED_CLASS  # the label of every head for an image the gate flags, when abstaining


@dataclass(frozen=True)
class Prediction:
    """One head's answer for one image."""

    image: Union[str, int]  # the path as given, or the position in the input list for in-memory images
    head: str
    label: str  # the decided class: thresholded for a binary head, the most probable class otherwise
    probabilities: Mapping[str, float]  # class name -> probability, calibrated by the head's temperature
    threshold: Optional[float]  # binary heads: the positive-class probability needed to predict it
    # the out-of-distribution gate's verdict on the image (the same on every head); None without a gate
    ood_score: Optional[float] = None  # higher = less like the training images
    in_distribution: Optional[bool] = None  # ood_score <= the gate's threshold
    site: Optional[str] = None  # the site profile whose heads answered (`mvit adapt`); None: the base heads
    # with a site whose gate judged the image: why it was flagged (every check it failed), else None
    ood_reason: Optional[str] = None

    @property
    def probability(self) -> Optional[float]:
        """The probability of the decided label; None when the label is `unknown` (abstained)."""
        return self.probabilities.get(self.label)

    def as_dict(self) -> dict:
        """The record as the CLI's JSON writes it: every field, and `probability` after `label`;
        `site` and `ood_reason` only where they say something (so records without sites are as
        they always were)."""
        record = {**asdict(self), "probabilities": dict(self.probabilities)}
        for optional in ("site", "ood_reason"):
            if record[optional] is None:
                del record[optional]
        at = list(record).index("label") + 1
        items = list(record.items())
        return dict(items[:at] + [("probability", self.probability)] + items[at:])


@dataclass(frozen=True)
class ImageResult:
    """One input's outcome: a prediction per selected head, or the one sentence saying why it failed."""

    image: Union[str, int]
    predictions: tuple[Prediction, ...] = ()
    error: Optional[str] = None


def decide(probabilities: np.ndarray, positive_index: Optional[int], threshold: Optional[float]) -> np.ndarray:
    """Probabilities (N, K) -> class indices (N,): a binary head predicts its positive class when that
    class's probability is at least the threshold; any other head predicts its most probable class."""
    if positive_index is None or threshold is None:
        return probabilities.argmax(axis=1)
    return np.where(probabilities[:, positive_index] >= threshold, positive_index, 1 - positive_index)


def calibrated(logits: Tensor, info: HeadInfo) -> Tensor:
    """Logits (N, K) -> probabilities (N, K) after the head's temperature scaling."""
    return (logits / info.temperature).softmax(dim=-1)


def thresholds_for(infos: Mapping[str, HeadInfo], heads: Sequence[str], override: Optional[float]) -> dict[str, Optional[float]]:
    """Each head's decision threshold: `override`, else the stored one, else 0.5; None for multi-class."""
    if override is not None:
        if not 0.0 <= override <= 1.0:
            raise ConfigError(f"a threshold is a probability between 0 and 1, got {override}")
        if not any(infos[name].is_binary for name in heads):
            raise ConfigError(
                f"a threshold applies to binary heads only, and {', '.join(heads)} "
                f"{'is' if len(heads) == 1 else 'are'} not binary; leave out --threshold"
            )
    chosen = {}
    for name in heads:
        info = infos[name]
        stored = info.threshold if info.threshold is not None else 0.5
        chosen[name] = (override if override is not None else stored) if info.is_binary else None
    return chosen
