"""The evaluation report: a trained head run over a dataset split, its metrics, calibration and
figures written where a clinician-researcher reads them (metrics.json, predictions.csv, PNGs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from mvit.runtime.distributed import Processes
from mvit.runtime.files import written_aside
from mvit.runtime.options import RunOptions
from mvit.errors import MvitError
from mvit.evaluate.evaluation_set import ALL_IMAGES, count_phrase, evaluation_set, split_settings
from mvit.evaluate.metrics import classification_metrics, expected_calibration_error, positive_index, reliability_bins
from mvit.core.model import Model
from mvit.infer.predict import logits_stream
from mvit.infer.prediction import calibrated, decide
from mvit.core.training_images import recorded_training_images


def leak_sentence(metrics: dict[str, Any]) -> Optional[str]:
    """The warning for evaluated images the model file records as its training images; None if none."""
    leaked = metrics.get("leaked_training_images")
    if not leaked:
        return None
    return (f"{leaked} of the {metrics['n']} images evaluated were training images of this model (same bytes or "
            f"ISIC id as an image its model file records), so these scores overstate how it does on new images; "
            f"metrics.json lists them under leaked_training_image_paths")


def _notes(metrics: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    """A sentence for each thing that changes how the report reads: images left out, classes
    without images, images the model learned from (or could not be checked for)."""
    from mvit.registry import manager

    head, dataset, split = metrics["head"], metrics["dataset"], metrics["split"]
    notes = []
    if metrics["left_out"]:
        notes.append(
            f"left out {sum(metrics['left_out'].values())} images whose label has no counterpart among the classes "
            f"of head {head}: {count_phrase(metrics['left_out'])}"
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
    record = recorded_training_images(provenance)
    if record is None and provenance.get("training"):  # trained by mvit, before model files recorded their images
        notes.append("this model file does not record its training images, so whether any evaluated image "
                      "was one of them cannot be checked")
    elif record is not None:
        if leak_sentence(metrics):
            notes.append(leak_sentence(metrics))
        if not record.complete:
            notes.append("the model file records the training images of only some of its training runs (it was "
                          "trained from a model file that did not record its own), so the count of evaluated "
                          "training images may be too low")
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
    run: RunOptions = RunOptions(),
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
    the model may have trained on). "leaked_training_images" counts the evaluated images that the
    model file records as its training images (same bytes or ISIC id), listed in
    "leaked_training_image_paths"; None for a model file without that record. run: precision, batch
    size, decoding processes (default: by image count and CPUs) and, under torchrun, the processes:
    every process computes the logits of its share of the images and rank 0 alone writes the report
    (the same as one process writes); the metrics are returned on every rank.
    """
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
    processes = run.processes or Processes()
    batch_size = run.batch_size
    mine = processes.shard(len(paths), batch_size)  # every image in one process; under torchrun, whole batches
    workers = run.workers_for(len(mine), model.device)

    found = []  # (input positions, logits (b, K), gate scores (b,) or None) per batch, and unreadable (position, sentence)
    errors: list[tuple[int, str]] = []
    for batch in logits_stream(model, [paths[i] for i in mine], [head], precision=run.precision, batch_size=batch_size, workers=workers):
        errors += [(mine[index], batch.errors[index]) for index in sorted(batch.errors)]
        if batch.indices:
            found.append(([mine[index] for index in batch.indices], batch.logits[head], batch.ood_scores))
    shares = processes.gather((found, errors))  # every rank's, on rank 0
    report = processes.on_main(lambda: _report(model, head, info, spec, root, out, dataset, split, chosen, paths, shares))
    return processes.share(report)


def _report(model: Model, head: str, info, spec, root, out, dataset: str, split: str, chosen, paths: list,
            shares: list) -> dict[str, Any]:
    """The metrics, predictions.csv and figures from every process's share of the logits, in input order."""
    items = chosen.items
    found = [batch for share, _ in shares for batch in share]
    rows = [index for positions, _, _ in found for index in positions]
    order = np.argsort(rows, kind="stable")  # rank r's rows are its batches r, r + world, ...: back to input order
    rows = [rows[k] for k in order]
    unreadable = [sentence for _, sentence in sorted(error for _, share in shares for error in share)]
    logits = [batch_logits for _, batch_logits, _ in found]
    ood_scores = [scores for _, _, scores in found if scores is not None]  # (b,) each: the model has a gate
    if not rows:
        raise MvitError(f"none of the {len(paths)} images of the {split} split could be read; run `mvit data check {dataset} --root {root}`")
    logits_all = torch.cat(logits)[torch.from_numpy(order)]  # (N, K)
    targets = np.array([items[index][1] for index in rows])  # (N,)
    raw = logits_all.softmax(dim=-1).numpy()
    probabilities = calibrated(logits_all, info).numpy()  # what predict reports

    positive = info.positive if info.is_binary else None
    metrics = classification_metrics(probabilities, targets, info.classes, positive, info.threshold)
    metrics = {
        "head": head,
        "site": model.site,  # the site profile whose head was evaluated; None: the base head
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
    record = recorded_training_images(model.provenance)  # None: the model file does not record them
    leaked = None if record is None else record.matches(paths[index] for index in rows)
    metrics["leaked_training_images"] = None if leaked is None else len(leaked)
    metrics["leaked_training_image_paths"] = [] if leaked is None else sorted(str(path) for path in leaked)
    metrics["notes"] = _notes(metrics, model.provenance)
    scores = torch.cat(ood_scores)[torch.from_numpy(order)].numpy() if ood_scores else None  # (N,), with a gate
    if scores is not None:
        metrics["ood"] = ood_report(model.ood_gate, scores, probabilities, targets, info.classes, positive, info.threshold)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with written_aside(out / "metrics.json") as partial:
        partial.write_text(json.dumps(metrics, indent=2) + "\n")
    predicted = decide(probabilities, positive_index(info.classes, positive), metrics.get("threshold"))
    _write_predictions(out / "predictions.csv", [paths[index] for index in rows], info.classes, targets, predicted,
                       probabilities, scores, model.ood_gate)

    _figures(out, metrics, info, raw, probabilities, targets)
    return metrics


def _figures(out: Path, metrics: dict, info, raw: np.ndarray, probabilities: np.ndarray, targets: np.ndarray) -> None:
    """The report's figures: confusion matrix, ROC (with the operating point of a binary head),
    confidence, and reliability before (`raw`, (N, K)) and after temperature scaling."""
    from mvit import plots

    positive = metrics["positive"]
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


def _write_predictions(path: Path, images: list, classes: Sequence[str], targets: np.ndarray, predicted: np.ndarray,
                       probabilities: np.ndarray, scores: Optional[np.ndarray], gate) -> None:
    """predictions.csv: a row per evaluated image (N), its true and predicted class, each class's
    probability (N, K) and, with a gate, its score (N,) and verdict; written whole or not at all."""
    with written_aside(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        gate_columns = ["ood_score", "in_distribution"] if scores is not None else []  # only with a gate
        writer.writerow(["image", "true", "predicted", "correct", *(f"p_{name}" for name in classes), *gate_columns])
        for row, image in enumerate(images):
            true, guess = classes[targets[row]], classes[predicted[row]]
            verdict = [] if scores is None else [f"{scores[row]:.6g}", int(gate.accepts(torch.tensor(scores[row])))]
            writer.writerow([str(image), true, guess, int(true == guess), *(f"{p:.6f}" for p in probabilities[row]), *verdict])
