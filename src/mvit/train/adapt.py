"""`mvit adapt`: a clinic's own heads, fitted from its labelled images, stored as a site profile.

For each head the labels reach, the site's images (their backbone features, through the feature
cache) are mixed with the features the base head was fitted on (the model's reference bank), the
site weighted to count as much as the training set, and a linear head is fitted in closed form
with the base head's penalty strength: the same engine `mvit train` uses (`linear_heads`). Where a
model records no bank, the site head is fitted on the site's images alone, pulled towards the base
head's weights.

Whether the site head is better is decided by k-fold cross-validation on the site's images,
repeated with other fold assignments: each fold's images are scored by a site head fitted without
them and by the base head as it is, fold by fold. A head whose mean cross-validated ROC AUC
(balanced accuracy for a head of more than two classes) is not above the base head's is left out,
and a site with no better head is refused: nothing is written. The site head's temperature and a binary head's threshold (for the stated
sensitivity) are fitted on the out-of-fold predictions, and the figures reported at that threshold
come from the same predictions, so they are optimistic by the choice of one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mvit.data.colour import lab_statistics
from mvit.data.dataset import BadImages
from mvit.data.images import load_image
from mvit.data.features import FeatureCache, fingerprint
from mvit.errors import ConfigError, DatasetError, MvitError
from mvit.evaluate.calibration import choose_threshold, fit_temperature
from mvit.evaluate.gate import gate_features
from mvit.core.model import Model
from mvit.core.gate import OODGate
from mvit.evaluate.gate import fit_tensors
from mvit.infer.prediction import calibrated
from mvit.core.sites import Site, SiteInfo
from mvit.core.heads import ClassifierHead, HeadInfo
from mvit.runtime.options import RunOptions
from mvit.runtime.precision import autocast_dtype
from mvit.datasets.bridging import classes_meaning
from mvit.registry import diagnoses, manager
from mvit.registry.specs import Sample
from mvit.registry.words import count
from mvit.train import linear_heads

MIN_PER_CLASS = 5  # fewer images of a class than this cannot be cross-validated into anything trustworthy
DEFAULT_STRENGTH = 0.1  # for a head that records no strength of its own (not fitted in closed form)


@dataclass(frozen=True)
class AdaptOptions:
    heads: Optional[list[str]] = None  # None: every head the labels reach
    site_weight: float = 1.0  # the site's total weight against the base head's training images
    target_sensitivity: float = 0.9
    folds: int = 5
    repeats: int = 5  # cross-validation repeated with other fold assignments: fewer chance refusals
    seed: int = 0
    include_flagged: bool = False  # learn from images the out-of-distribution gate flags (the user has looked at them)
    keep_all: bool = False  # keep every site head, better in cross-validation or not (for measuring the fit itself)


@dataclass
class HeadResult:
    name: str
    report: dict  # the figures of SiteInfo.report
    adopted: bool
    head: Optional[ClassifierHead] = None
    info: Optional[HeadInfo] = None


@dataclass
class Adaptation:
    site: str
    images: int
    results: list[HeadResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def adopted(self) -> list[HeadResult]:
        return [r for r in self.results if r.adopted]


def adapt(model: Model, site: str, samples: Sequence[Sample], options: AdaptOptions, *, cache: Path, labels: str = "",
          run: RunOptions = RunOptions()) -> Adaptation:
    """Fit site `site` from labelled `samples`; `model.sites[site]` is set when any head is better."""
    if options.site_weight <= 0 or not math.isfinite(options.site_weight):
        raise ConfigError(f"--site-weight must be a positive number, got {options.site_weight}")
    targets = site_targets(model, samples, options.heads)
    paths = [sample.path for sample in samples]
    device = model.device
    dtype = autocast_dtype(run.precision, device)
    workers = run.workers_for(len(paths), device)
    features_cache = FeatureCache(cache, warn=run.say, bad_images=BadImages("stop"))
    features_cache.prepare()
    run.say(f"backbone features of {count(len(paths), 'image')}")
    features = features_cache.load(model.backbone, model.preprocessing, paths, device=device, dtype=dtype, workers=workers)
    looked_at = None  # the gate's feature of each image (n, D), where the model has a gate
    if model.ood_gate is not None:
        looked_at = gate_features(model, paths, model.ood_gate.info.layer, cache, run)
        if not options.include_flagged:
            _check_flagged(model.ood_gate, looked_at, paths)
    result = Adaptation(site, len(samples))
    groups = [sample.group for sample in samples]
    for name, column in targets.items():
        used = column >= 0
        result.results.append(_adapt_head(model, name, features[used], column[used], [g for g, u in zip(groups, used) if u],
                                          options, result.notes))
    adopted = result.adopted
    if adopted:
        gate = None if looked_at is None else site_gate(model.ood_gate, looked_at, options.seed)
        info = SiteInfo(name=site, heads={r.name: r.info for r in adopted}, images=len(samples), labels=labels,
                        report={r.name: r.report for r in result.results},
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), site_weight=options.site_weight,
                        gate=None if gate is None else gate.info, colour=lab_statistics(load_image(path) for path in paths))
        model.sites[site] = Site(info, {r.name: r.head for r in adopted}, gate)
    return result


# ---- labels to classes --------------------------------------------------------------------------------


def site_targets(model: Model, samples: Sequence[Sample], heads: Optional[list[str]]) -> dict[str, Tensor]:
    """Head -> each sample's class index (n,), -1 where the head cannot use its label; only heads
    with at least MIN_PER_CLASS images of every class (an asked-for head without them is an error)."""
    chosen = model.select_heads(heads)  # an unknown head: one sentence naming those there are
    labels = sorted({sample.label for sample in samples})
    known = set(diagnoses.TERMS) | {cls for info in model.heads.values() for cls in info.classes}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise DatasetError(f"unknown label{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in the labels "
                           f"file; use mvit's diagnosis words ({', '.join(sorted(diagnoses.TERMS))}) or a head's own "
                           f"class names")
    columns, problems = {}, []
    for name in chosen:
        mapping = _class_of_labels(model.heads[name], labels)
        index = {cls: i for i, cls in enumerate(model.heads[name].classes)}
        column = torch.tensor([index[mapping[s.label]] if mapping[s.label] else -1 for s in samples], dtype=torch.long)
        counts = {cls: int((column == i).sum()) for cls, i in index.items()}
        short = {cls: n for cls, n in counts.items() if n < MIN_PER_CLASS}
        if short:
            problems.append(f"head {name} ({', '.join(f'{cls}: {n}' for cls, n in counts.items())})")
            continue
        columns[name] = column
    if heads is not None and problems:
        raise DatasetError(f"a site head needs at least {MIN_PER_CLASS} labelled images of each of its classes, and the labels "
                           f"give {'; '.join(problems)}; add images of the missing classes or leave those heads out")
    if not columns:
        raise DatasetError(f"no head of the model can learn from these labels: a site head needs at least {MIN_PER_CLASS} "
                           f"labelled images of each of its classes ({'; '.join(problems)})")
    return columns


def _class_of_labels(info: HeadInfo, labels: list[str]) -> dict[str, Optional[str]]:
    """Each label's class of the head: a class name as it is; a diagnosis word through the head's
    dataset's declared diagnoses (None where it falls into no class, or into several)."""
    mapping: dict[str, Optional[str]] = {label: label if label in info.classes else None for label in labels}
    words = {label: (label,) for label in labels if label not in info.classes and label in diagnoses.TERMS}
    if words:
        try:
            spec = manager.get_head(info.name)
            mapping.update(classes_meaning(spec, manager.get_dataset(spec.dataset), words))
        except MvitError:  # the head's plugin is not installed here: its class names still work
            pass
    return mapping


# ---- one head -----------------------------------------------------------------------------------------


def _adapt_head(model: Model, name: str, X: Tensor, y: Tensor, groups: list[str], options: AdaptOptions,
                notes: list[str]) -> HeadResult:
    """Cross-validate, then fit on every site image, the site version of head `name`."""
    base = model.heads[name]
    K = len(base.classes)
    fit = _site_fitter(model, name, K, options, notes)
    with torch.no_grad():
        base_probabilities = calibrated(model.head_logits(X.to(model.device), name)[name].float().cpu(), base)
    score = _scorer(base)
    folds, out_of_fold = [], torch.zeros(len(y), K)  # every repeat's folds; the first repeat's predictions
    for repeat in range(options.repeats):
        for train, held_out in _folds(y, groups, options.folds, options.seed + repeat):
            logits = fit(X[train], y[train]).logits(X[held_out])
            if repeat == 0:
                out_of_fold[held_out] = logits
            folds.append((score(base_probabilities[held_out].numpy(), y[held_out].numpy()),
                          score(torch.softmax(logits, dim=1).numpy(), y[held_out].numpy())))
    temperature = fit_temperature(out_of_fold, y)
    probabilities = torch.softmax(out_of_fold / temperature, dim=1)
    per_repeat = len(folds) // options.repeats
    b, s = np.array(folds).T
    report = {"images": len(y), "classes": {cls: int((y == i).sum()) for i, cls in enumerate(base.classes)},
              "folds": per_repeat, "repeats": options.repeats, "temperature": round(temperature, 4),
              "metric": "roc_auc" if base.is_binary else "balanced_accuracy",
              "base": _mean_interval(b, per_repeat), "site": _mean_interval(s, per_repeat),
              "difference": _mean_interval(s - b, per_repeat, -1.0, 1.0)}
    if base.is_binary:
        report.update(_operating_point(probabilities.numpy(), y.numpy(), base, options.target_sensitivity))
    report["adopted"] = report["site"]["value"] > report["base"]["value"]
    adopted = report["adopted"] or options.keep_all
    if not adopted:
        return HeadResult(name, report, False)
    final = fit(X, y)
    head = ClassifierHead(X.shape[1], K, base.config)
    with torch.no_grad():
        head.layers[-1].weight.copy_(final.weight)
        head.layers[-1].bias.copy_(final.bias)
    metric = report["metric"]
    metrics = {f"site_cv_{metric}": report["site"]["value"], f"base_cv_{metric}": report["base"]["value"]}
    changes = {"temperature": temperature, "calibrated": True, "metrics": metrics}
    if base.is_binary:
        changes["threshold"] = report["threshold"]
        changes["threshold_target"] = f"sensitivity >= {options.target_sensitivity:g} on the site's cross-validated images"
        metrics.update({"site_cv_sensitivity": report["sensitivity"]["value"], "site_cv_specificity": report["specificity"]["value"]})
    info = HeadInfo.model_validate({**base.model_dump(), **changes})
    return HeadResult(name, report, True, head.eval(), info)


def _site_fitter(model: Model, name: str, classes: int, options: AdaptOptions, notes: list[str]):
    """A function (features, targets) -> LinearHead: the site's images mixed with the base head's
    training features where the model records them, else alone and pulled towards the base head."""
    base = model.heads[name]
    strength = base.l2_strength or DEFAULT_STRENGTH
    reference = model.reference
    usable = (reference is not None and name in reference.info.heads
              and reference.info.fingerprint == fingerprint(model.backbone, model.preprocessing))
    if usable:
        Xr, yr = reference.rows(name)
        wr = linear_heads.balanced_weights(yr, classes) / len(yr)

        def mixed(Xs: Tensor, ys: Tensor) -> linear_heads.LinearHead:
            ws = options.site_weight * linear_heads.balanced_weights(ys, classes) / len(ys)
            return linear_heads.fit(torch.cat([Xr, Xs]), torch.cat([yr, ys]), classes, strength=strength, weights=torch.cat([wr, ws]))

        return mixed
    notes.append(f"the model does not record the features head {name} was fitted on, so its site head learns from the "
                 f"site's images alone, pulled towards the base head")
    layer = model.classifiers[name].layers[-1]
    anchor = (layer.weight.detach().float().cpu(), layer.bias.detach().float().cpu())
    return lambda Xs, ys: linear_heads.fit(Xs, ys, classes, strength=1.0, anchor=anchor)


def _folds(y: Tensor, groups: list[str], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds that keep each group (lesion) on one side; as many as the rarest class allows."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, min(folds, int(torch.bincount(y).min())))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y.numpy(), groups))


# ---- the figures --------------------------------------------------------------------------------------


def _scorer(info: HeadInfo) -> Callable[[np.ndarray, np.ndarray], float]:
    """(probabilities (n, K), targets (n,)) -> ROC AUC of a binary head's positive class, else balanced accuracy.

    Scored fold by fold, never on the folds' predictions pooled: each fold's site head is a model of
    its own, and pooling would rank one model's scores against another's."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if info.is_binary:
        positive = info.positive_index
        return lambda p, y: float(roc_auc_score(y == positive, p[:, positive]))
    return lambda p, y: float(balanced_accuracy_score(y, p.argmax(1)))


def _mean_interval(values: np.ndarray, folds: int, low: float = 0.0, high: float = 1.0) -> dict:
    """The mean of per-fold figures, with mean +- 1.96 standard errors (the spread across folds over
    the square root of the folds of one repeat: repeats of the same images add no independent data),
    kept within the figure's range [low, high]."""
    mean, error = float(values.mean()), 1.959964 * float(values.std(ddof=1)) / math.sqrt(folds)
    return {"value": round(mean, 4), "ci95": [round(max(low, mean - error), 4), round(min(high, mean + error), 4)]}


def _operating_point(probabilities: np.ndarray, y: np.ndarray, info: HeadInfo, target: float) -> dict:
    """A binary head's threshold for `target` sensitivity, chosen on the out-of-fold predictions, and
    the sensitivity and specificity it gives there (Wilson intervals)."""
    positive = info.positive_index
    is_positive = y == positive
    threshold = choose_threshold(probabilities[:, positive], is_positive, target)
    flagged = probabilities[:, positive] >= threshold
    return {"threshold": round(threshold, 4),
            "sensitivity": _proportion(int((flagged & is_positive).sum()), int(is_positive.sum())),
            "specificity": _proportion(int((~flagged & ~is_positive).sum()), int((~is_positive).sum()))}


def _proportion(hits: int, total: int) -> dict:
    """hits / total with its 95 % Wilson score interval."""
    z = 1.959964
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return {"value": round(p, 4), "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)],
            "n": total}


# ---- images unlike the training images -------------------------------------------------------------


def _check_flagged(gate, looked_at: Tensor, paths: list[Path]) -> None:
    """Refuse images the model's gate flags unless the user has looked at them: a photograph, a
    screenshot or another modality among the labels would teach the site's heads nonsense. The
    gate cannot tell those from a clinic's real but unusual lesions (measured: PH2's most unusual
    lesions score as high as crops of photographs do, docs/results.md), so the user decides."""
    scores = gate.score(looked_at).numpy()
    flagged = np.flatnonzero(scores > gate.threshold)
    if len(flagged):
        first = flagged[np.argmax(scores[flagged])]
        raise DatasetError(f"{count(len(flagged), 'labelled image')} of {len(paths)} look unlike the images the model was "
                           f"trained on (its out-of-distribution gate flags them; the most unusual: {paths[first]}, score "
                           f"{scores[first]:.1f} against {gate.threshold:.1f}); look at them, take out any that is not a "
                           f"dermoscopic image, and pass --include-flagged to learn from the rest")


def site_gate(gate: OODGate, looked_at: Tensor, seed: int = 0) -> Optional[OODGate]:
    """The site's own gate: the model gate's method on the site images' features (n, D), its
    threshold accepting the same share of the site's images, each scored by a gate fitted without
    it (5 folds: a gate scores its own images as closer than new ones). None for fewer than 10 images."""
    from sklearn.model_selection import KFold

    n = len(looked_at)
    if n < 10:
        return None
    held_out = np.zeros(n)
    for train, test in KFold(5, shuffle=True, random_state=seed).split(np.zeros(n)):
        fold = OODGate(gate.info, fit_tensors(looked_at[train], gate.method))
        held_out[test] = fold.score(looked_at[test]).numpy()
    threshold = float(np.quantile(held_out, gate.info.quantile, method="higher"))
    info = gate.info.model_copy(update={"threshold": threshold, "train_images": n, "valid_images": n, "datasets": []})
    return OODGate(info, fit_tensors(looked_at, gate.method))
