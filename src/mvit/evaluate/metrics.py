"""How good a head's probabilities are: classification metrics, the binary operating point's
sensitivity and specificity, and calibration (reliability bins, expected calibration error)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mvit.infer.prediction import decide

CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) measure ECE


def classification_metrics(
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    positive: Optional[str] = None,
    threshold: Optional[float] = None,
) -> dict[str, Any]:
    """Metrics of probabilities (N, K) against class indices (N,), as a JSON-ready dict.

    Top-level numbers are plain floats (or None where undefined, e.g. ROC AUC with one class
    present); `per_class` and `confusion_matrix` (rows true, columns predicted, in `classes` order)
    are nested. A binary head with `positive` decides with `threshold` on the positive class
    probability (0.5 when None) and adds sensitivity and specificity at that threshold.
    """
    from sklearn.metrics import (
        accuracy_score,
        brier_score_loss,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    K = len(classes)
    probabilities, targets = _checked(probabilities, targets, K)
    positive_at = positive_index(classes, positive)
    if positive_at is not None and threshold is None:
        threshold = 0.5
    predicted = decide(probabilities, positive_at, threshold)
    labels = list(range(K))
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    metrics: dict[str, Any] = {
        "n": int(len(targets)),
        "accuracy": float(accuracy_score(targets, predicted)),
        "balanced_accuracy": _balanced_accuracy(targets, predicted),
        "macro_f1": float(np.mean(f1)),
        "roc_auc": _roc_auc(probabilities, targets, positive_at),
        "ece": expected_calibration_error(probabilities, targets),
        "brier": float(brier_score_loss(targets, probabilities, labels=labels)),
    }
    if positive_at is not None:
        metrics["threshold"] = float(threshold)
        metrics["sensitivity"] = float(recall[positive_at]) if support[positive_at] else None
        negative = 1 - positive_at
        metrics["specificity"] = float(recall[negative]) if support[negative] else None
    metrics["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    metrics["confusion_matrix"] = confusion_matrix(targets, predicted, labels=labels).tolist()
    return metrics


def _checked(probabilities, targets, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, K) as float64 rows summing to 1 and targets (N,) as int64, or ValueError."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    # float32 softmax rows sum to 1 only within ~1e-7, which sklearn's probability checks reject
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    targets = np.asarray(targets, dtype=np.int64)
    if probabilities.ndim != 2 or probabilities.shape != (len(targets), K) or len(targets) == 0:
        raise ValueError(f"need probabilities (N, {K}) and targets (N,) with N > 0, got {probabilities.shape} and {targets.shape}")
    return probabilities, targets


def _roc_auc(probabilities: np.ndarray, targets: np.ndarray, positive_at: Optional[int]) -> Optional[float]:
    """ROC AUC of the positive class for a binary head with one, else one-vs-rest macro; None when
    a class it needs is absent from `targets`."""
    from sklearn.metrics import roc_auc_score

    K, present = probabilities.shape[1], np.unique(targets)
    if positive_at is not None:
        return float(roc_auc_score(targets == positive_at, probabilities[:, positive_at])) if len(present) == 2 else None
    if len(present) < K:
        return None
    if K == 2:
        return float(roc_auc_score(targets, probabilities[:, 1]))
    return float(roc_auc_score(targets, probabilities, multi_class="ovr", average="macro", labels=list(range(K))))


def _balanced_accuracy(targets: np.ndarray, predicted: np.ndarray) -> float:
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        # sklearn warns when a predicted class is absent from the targets; the score is still defined
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(targets, predicted))


def positive_index(classes: Sequence[str], positive: Optional[str]) -> Optional[int]:
    if positive is None:
        return None
    if len(classes) != 2 or positive not in classes:
        raise ValueError(f"positive class {positive!r} needs a binary head whose classes include it, got {list(classes)}")
    return list(classes).index(positive)


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-class confidence in equal-width bins: each bin's mean confidence, accuracy and count."""

    edges: np.ndarray  # (bins + 1,)
    confidence: np.ndarray  # (bins,), NaN where empty
    accuracy: np.ndarray  # (bins,), NaN where empty
    count: np.ndarray  # (bins,)


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS) -> ReliabilityBins:
    confidence = probabilities.max(axis=1)  # (N,)
    correct = probabilities.argmax(axis=1) == targets  # (N,)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur (K >= 2)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return ReliabilityBins(edges, mean_confidence, accuracy, count)


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by how many predictions each holds."""
    table = reliability_bins(np.asarray(probabilities, dtype=np.float64), np.asarray(targets), bins)
    filled = table.count > 0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float(np.sum(gaps * table.count[filled]) / table.count.sum())
