"""How good a head is: metrics, the binary operating point, temperature calibration, the report.

Training imports `fit_temperature`, `choose_threshold` and `classification_metrics` to store a
head's calibration, threshold and validation metrics in the model file; `evaluate_head` runs a
trained head over a dataset split and writes the report a clinician-researcher reads.

Order matters: the temperature is fitted first, and the threshold is then chosen on the
*calibrated* positive-class probabilities, because those are what `predict` compares it with.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mvit.infer.model import Model
from mvit.data.dataset import loader_workers
from mvit.infer.predict import logits_stream
from mvit.infer.prediction import calibrated, decide
from mvit.errors import ConfigError, MvitError

DEFAULT_TARGET_SENSITIVITY = 0.9  # missing a melanoma costs more than a false alarm
CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) measure ECE
# A fitted temperature outside this range means the validation set was separable or degenerate;
# clamping keeps one odd validation split from turning a head's probabilities into 0s and 1s.
TEMPERATURE_RANGE = (0.05, 20.0)


# ---- calibration and operating point (imported by training) ---------------------------------------


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


# ---- metrics --------------------------------------------------------------------------------------


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
        roc_auc_score,
    )

    probabilities = np.asarray(probabilities, dtype=np.float64)
    # float32 softmax rows sum to 1 only within ~1e-7, which sklearn's probability checks reject
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    targets = np.asarray(targets, dtype=np.int64)
    K = len(classes)
    if probabilities.ndim != 2 or probabilities.shape != (len(targets), K) or len(targets) == 0:
        raise ValueError(f"need probabilities (N, {K}) and targets (N,) with N > 0, got {probabilities.shape} and {targets.shape}")
    positive_index = _positive_index(classes, positive)
    if positive_index is not None and threshold is None:
        threshold = 0.5
    predicted = decide(probabilities, positive_index, threshold)
    labels = list(range(K))
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    metrics: dict[str, Any] = {
        "n": int(len(targets)),
        "accuracy": float(accuracy_score(targets, predicted)),
        "balanced_accuracy": _balanced_accuracy(targets, predicted),
        "macro_f1": float(np.mean(f1)),
        "roc_auc": None,
        "ece": expected_calibration_error(probabilities, targets),
        "brier": float(brier_score_loss(targets, probabilities, labels=labels)),
    }
    present = np.unique(targets)
    if positive_index is not None:
        metrics["threshold"] = float(threshold)
        metrics["sensitivity"] = float(recall[positive_index]) if support[positive_index] else None
        negative = 1 - positive_index
        metrics["specificity"] = float(recall[negative]) if support[negative] else None
        if len(present) == 2:
            metrics["roc_auc"] = float(roc_auc_score(targets == positive_index, probabilities[:, positive_index]))
    elif len(present) == K:
        if K == 2:
            metrics["roc_auc"] = float(roc_auc_score(targets, probabilities[:, 1]))
        else:
            metrics["roc_auc"] = float(roc_auc_score(targets, probabilities, multi_class="ovr", average="macro", labels=labels))
    metrics["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    metrics["confusion_matrix"] = confusion_matrix(targets, predicted, labels=labels).tolist()
    return metrics


def _balanced_accuracy(targets: np.ndarray, predicted: np.ndarray) -> float:
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        # sklearn warns when a predicted class is absent from the targets; the score is still defined
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(targets, predicted))


def _positive_index(classes: Sequence[str], positive: Optional[str]) -> Optional[int]:
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


# ---- the evaluation report ------------------------------------------------------------------------


def split_settings(provenance: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The split a model was trained with, from its model file: {"seed", "fold", "folds", "fractions"}.

    Evaluating on any other split would score the model on images it trained on, so the report
    uses this one; files without the record get the defaults training uses.
    """
    from mvit.registry import manager
    from mvit.registry.splits import DEFAULT_FOLDS, DEFAULT_SEED

    stored = (provenance.get("splits") or {}).get(dataset) or {}
    official = manager.get_dataset(dataset).official_splits  # training ignores a fold for these too
    return {
        "seed": int(stored.get("seed", DEFAULT_SEED)),
        "fold": None if official else stored.get("fold"),
        "folds": int(stored.get("folds", DEFAULT_FOLDS)),
        "fractions": stored.get("fractions"),
    }


ALL_IMAGES = "all"  # the split name meaning every image of the dataset


@dataclass(frozen=True)
class EvaluationSet:
    """The images a head is scored on, each with its class index, and what was left out on the way."""

    head: str
    dataset: str
    split: str  # a split of the dataset, or ALL_IMAGES
    settings: Optional[dict[str, Any]]  # the split settings used; None for ALL_IMAGES
    items: list[tuple[Any, int]]  # (Sample, index of its class in the head)
    label_map: dict[str, Optional[str]]  # the dataset's label -> the head's class; None: left out
    left_out: dict[str, int]  # label -> images of the split left out because the head has no class for it


def evaluation_set(
    head: str, dataset: str, root: Union[str, Path], split: str = "test", splits: Optional[dict[str, Any]] = None
) -> EvaluationSet:
    """The images of `split` (`all`: every image) of `dataset` at `root` that `head` can be scored on.

    On the head's own dataset its `label_map` gives each image's class, as in training. On any other
    dataset the diagnosis vocabulary does (`mvit.registry.diagnoses.bridge_label_map`): images whose
    label matches no single class of the head are left out and counted, and a dataset none of whose
    labels match is a ConfigError. splits: {"seed", "fold", "folds", "fractions"} for a named split
    (default: the training defaults); `all` ignores them and leaves out augmented copies, which
    duplicate other images of the dataset.
    """
    from collections import Counter

    from mvit.registry import manager
    from mvit.registry.diagnoses import bridge_label_map
    from mvit.registry.records import load_samples
    from mvit.registry.splits import samples_for

    spec, data = manager.get_head(head), manager.get_dataset(dataset)
    label_map = bridge_label_map(spec, manager.get_dataset(spec.dataset), data)
    if split == ALL_IMAGES:
        settings = None
        samples = [sample for sample in load_samples(dataset, root) if not sample.meta.get("augmented")]
    elif split in data.splits:
        settings = dict(splits or {})
        samples = samples_for(dataset, root, split, **settings)
    else:
        raise ConfigError(f"{dataset} has no split {split!r}; choose {ALL_IMAGES} or one of {', '.join(data.splits)}")
    items, left_out = [], Counter()
    for sample in samples:
        cls = label_map.get(sample.label)
        if cls is None:
            left_out[sample.label] += 1
        else:
            items.append((sample, spec.classes.index(cls)))
    if not items:
        where = f"{dataset} at {root}" if split == ALL_IMAGES else f"the {split} split of {dataset} at {root}"
        raise ConfigError(f"{where} has no images for head {head}" + (f" (left out: {_counts(left_out)})" if left_out else ""))
    return EvaluationSet(head, dataset, split, settings, items, label_map, dict(sorted(left_out.items())))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {label}" for label, count in sorted(counts.items()))


def _notes(metrics: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    """A sentence for each thing that changes how the report reads: images left out, classes
    without images, images the model may have learned from."""
    from mvit.registry import manager

    head, dataset, split = metrics["head"], metrics["dataset"], metrics["split"]
    notes = []
    if metrics["left_out"]:
        notes.append(
            f"left out {sum(metrics['left_out'].values())} images whose label has no counterpart among the classes "
            f"of head {head}: {_counts(metrics['left_out'])}"
        )
    if metrics["classes_without_images"]:
        notes.append(
            f"no image evaluated here is of class {', '.join(metrics['classes_without_images'])} of head {head}, "
            f"so its recall and the ROC AUC are not measured"
        )
    if dataset in (provenance.get("splits") or {}) and split in (ALL_IMAGES, manager.get_dataset(dataset).splits[0]):
        what = "all its images include" if split == ALL_IMAGES else "its training split holds"
        notes.append(
            f"the model file records training on {dataset}, so {what} images the model learned from "
            f"(the backbone or some head); --split test scores held-out images only"
        )
    return notes


def evaluate_head(
    model: Model,
    head: str,
    root: Union[str, Path],
    out: Union[str, Path],
    *,
    dataset: Optional[str] = None,
    split: str = "test",
    splits: Optional[dict[str, Any]] = None,
    precision: str = "auto",
    batch_size: int = 32,
    workers: Optional[int] = None,
) -> dict[str, Any]:
    """Run `head` over one split (`all`: every image) of a dataset at `root`; write the report to `out`.

    dataset: the installed dataset to score on; default the head's own. On its own dataset the head's
    spec maps labels to classes; on another, the diagnosis vocabulary does, and images whose label
    has no counterpart among the head's classes are left out and counted (`evaluation_set`).
    splits: {"seed", "fold", "folds", "fractions"}, which must be those of training; default: what
    the model file recorded for that dataset (`split_settings(model.provenance, dataset)`).
    Writes metrics.json (returned as a dict), predictions.csv and four PNG figures. Images that
    cannot be decoded are left out and listed under "unreadable" in metrics.json; "notes" holds a
    sentence for each thing a reader should know (labels left out, classes without images, images
    the model may have trained on). workers: decoding processes (default: by image count and CPUs).
    """
    from mvit import plots
    from mvit.registry import manager

    model.select_heads(head)
    info = model.heads[head]
    spec = manager.get_head(head)
    if tuple(spec.classes) != tuple(info.classes):
        raise MvitError(
            f"the model's head {head} predicts {', '.join(info.classes)}, but the installed plugin's head {head} "
            f"has classes {', '.join(spec.classes)}; install the plugin version the model was trained with"
        )
    dataset = spec.dataset if dataset is None else dataset
    splits = split_settings(model.provenance, dataset) if splits is None and split != ALL_IMAGES else splits
    chosen = evaluation_set(head, dataset, root, split, splits)
    items = chosen.items
    paths = [sample.path for sample, _ in items]
    workers = loader_workers(len(paths), batch_size, next(model.parameters()).device) if workers is None else workers

    rows, logits, unreadable, ood_scores = [], [], [], []
    for batch in logits_stream(model, paths, [head], precision=precision, batch_size=batch_size, workers=workers):
        unreadable += [batch.errors[index] for index in sorted(batch.errors)]
        rows += batch.indices
        if batch.indices:
            logits.append(batch.logits[head])
            if batch.ood_scores is not None:
                ood_scores.append(batch.ood_scores)  # (b,): the model has an out-of-distribution gate
    if not rows:
        raise MvitError(f"none of the {len(paths)} images of the {split} split could be read; run `mvit data check {dataset} --root {root}`")
    logits_all = torch.cat(logits)  # (N, K)
    targets = np.array([items[index][1] for index in rows])  # (N,)
    raw = logits_all.softmax(dim=-1).numpy()
    probabilities = calibrated(logits_all, info).numpy()  # what predict reports

    positive = info.positive if info.is_binary else None
    metrics = classification_metrics(probabilities, targets, info.classes, positive, info.threshold)
    metrics = {
        "head": head,
        "dataset": dataset,
        "head_dataset": spec.dataset,  # the dataset the head was trained on
        "classes": list(info.classes),
        "positive": positive,
        "root": str(root),
        "split": split,
        "split_settings": chosen.settings,
        "label_map": chosen.label_map,
        "left_out": chosen.left_out,
        "classes_without_images": [name for index, name in enumerate(info.classes) if not np.any(targets == index)],
        "temperature": info.temperature,
        "ece_before_temperature": expected_calibration_error(raw, targets),
        "ece_after_temperature": metrics["ece"],
        **metrics,
        "unreadable": unreadable,
    }
    metrics["notes"] = _notes(metrics, model.provenance)
    scores = torch.cat(ood_scores).numpy() if ood_scores else None  # (N,), with a gate
    if scores is not None:
        metrics["ood"] = ood_report(model.ood_gate, scores, probabilities, targets, info.classes, positive, info.threshold)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    predicted = decide(probabilities, _positive_index(info.classes, positive), metrics.get("threshold"))
    with open(out / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        gate_columns = ["ood_score", "in_distribution"] if scores is not None else []  # only with a gate
        writer.writerow(["image", "true", "predicted", "correct", *(f"p_{name}" for name in info.classes), *gate_columns])
        for row, index in enumerate(rows):
            true, guess = info.classes[targets[row]], info.classes[predicted[row]]
            verdict = [] if scores is None else [f"{scores[row]:.6g}", int(model.ood_gate.accepts(torch.tensor(scores[row])))]
            writer.writerow([str(paths[index]), true, guess, int(true == guess), *(f"{p:.6f}" for p in probabilities[row]), *verdict])

    plots.confusion_matrix_figure(metrics["confusion_matrix"], info.classes, out / "confusion_matrix.png")
    operating_point = None
    if positive is not None and metrics["sensitivity"] is not None and metrics["specificity"] is not None:
        operating_point = (metrics["specificity"], metrics["sensitivity"])
    plots.roc_figure(probabilities, targets, info.classes, out / "roc.png", positive=positive, operating_point=operating_point)
    plots.confidence_figure(
        probabilities, targets, info.classes, out / "confidence.png", positive=positive, threshold=metrics.get("threshold")
    )
    plots.reliability_figure(
        reliability_bins(raw, targets), reliability_bins(probabilities, targets), out / "reliability.png", temperature=info.temperature
    )
    return metrics


def ood_report(
    gate,
    scores: np.ndarray,
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    positive: Optional[str] = None,
    threshold: Optional[float] = None,
) -> dict[str, Any]:
    """What the out-of-distribution gate does to an evaluation: how many images it accepts
    (scores (N,) at most its threshold), and the metrics on those images alone (None if it accepts none)."""
    accepted = gate.accepts(torch.from_numpy(np.asarray(scores, dtype=np.float32))).numpy()  # (N,) bool
    return {
        "method": gate.method,
        "threshold": gate.threshold,
        "accepted": int(accepted.sum()),
        "accepted_fraction": float(accepted.mean()),
        "metrics_on_accepted": (
            classification_metrics(probabilities[accepted], targets[accepted], classes, positive, threshold) if accepted.any() else None
        ),
    }
