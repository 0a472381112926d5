"""Calibrating a head on validation data: its temperature, and a binary head's operating threshold.

Order matters: the temperature is fitted first, and the threshold is then chosen on the
*calibrated* positive-class probabilities, because those are what `predict` compares it with.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TARGET_SENSITIVITY = 0.9  # missing a melanoma costs more than a false alarm
# A fitted temperature outside this range means the validation set was separable or degenerate;
# clamping keeps one odd validation split from turning a head's probabilities into 0s and 1s.
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on validation data.

    logits (N, K), targets (N,) class indices. Optimised over log T with L-BFGS, so T stays positive.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or len(targets) == 0:
        raise ValueError(f"need logits (N, K) and targets (N,) with N > 0, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logits, targets = logits.detach().float().cpu(), targets.detach().long().cpu()
    log_t = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():  # training may call this inside torch.no_grad()
        optimiser.step(nll)
    low, high = TEMPERATURE_RANGE
    return float(min(max(math.exp(log_t.item()), low), high))


def choose_threshold(
    positive_probabilities: np.ndarray, is_positive: np.ndarray, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
) -> float:
    """The highest threshold t at which `p >= t` still flags `target_sensitivity` of the positives.

    Higher thresholds mean fewer false alarms, so the highest one that meets the sensitivity target
    is the best operating point for it. It is one of the positives' own probabilities: the k-th
    highest, where k = ceil(target * positives).
    """
    probabilities = np.asarray(positive_probabilities, dtype=np.float64)
    positive = np.asarray(is_positive, dtype=bool)
    if probabilities.shape != positive.shape:
        raise ValueError(f"probabilities {probabilities.shape} and labels {positive.shape} differ in shape")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if not positive.any():
        raise ValueError("cannot choose a threshold without a single positive example")
    descending = np.sort(probabilities[positive])[::-1]
    # the tolerance keeps 0.9 * 10 (= 9.000000000000002 in floating point) at 9 positives, not 10
    needed = math.ceil(target_sensitivity * len(descending) - 1e-9)
    return float(descending[max(needed, 1) - 1])
