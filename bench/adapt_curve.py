"""`mvit adapt` on PH2: how a clinic's own labelled images lift the melanoma heads on its other images.

PH2 stands in for a clinic the HAM10000 and DermMel heads never saw. For each number of labelled
images (drawn at random from PH2's training split, several draws each, melanomas in their share of
it but at least the 5 adapt needs), the site is fitted exactly
as `mvit adapt` fits it, and every PH2 image not drawn is scored three ways, melanoma against the
rest (ROC AUC): by the base head, by the site head as fitted, and by what `predict --site` answers
(the site head where adapt kept it, the base head where cross-validation refused it).

    python bench/adapt_curve.py [--draws 5] [--sizes 20 40 60 90] [--model FILE] [--root ../shared/data/ph2]

Prints one row per size and head, the seconds per adaptation (feature extraction of new images
dominates: it is cached), and ends with `ratio: <mean AUC with the site / base AUC>` at 60 images
for `ham10000-mel`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED_DATA  # noqa: E402

import mvit  # noqa: E402
from mvit.data.features import FeatureCache  # noqa: E402
from mvit.evaluate.evaluation_set import split_settings  # noqa: E402
from mvit.datasets import splits  # noqa: E402
from mvit.train.adapt import AdaptOptions, adapt  # noqa: E402

HEADS = ("ham10000-mel", "dermmel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--root", default=str(SHARED_DATA / "ph2"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 60, 90])
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    if not Path(args.root).is_dir():
        sys.exit(f"no PH2 folder at {args.root}; pass --root")
    torch.set_num_threads(2)
    model = mvit.load(args.model)
    per_split = splits.split_dataset("ph2", args.root, **split_settings(model.provenance, "ph2"))
    pool = per_split["train"]  # the labelled images a clinic would have
    everything = [sample for samples in per_split.values() for sample in samples]
    cache = Path(tempfile.mkdtemp()) / "features.h5"
    features = FeatureCache(cache).load(model.backbone, model.preprocessing, [s.path for s in everything], device=torch.device("cpu"))
    index = {sample.path: row for row, sample in enumerate(everything)}
    melanoma = np.array([sample.label == "melanoma" for sample in everything])

    def auc(view, head: str, rows: np.ndarray) -> float:
        with torch.no_grad():
            p = view.head_logits(features[rows], head)[head].softmax(-1)[:, view.heads[head].classes.index("melanoma")]
        return float(roc_auc_score(melanoma[rows], p.numpy()))

    print(f"PH2: {len(pool)} training images to draw from, {len(everything)} in all; {args.draws} draws per size")
    print(f"{'labelled':>8} {'head':<13} {'base':>13} {'site head':>13} {'with --site':>13} {'kept':>5} {'s/adapt':>8}")
    ratio = None
    for size in args.sizes:
        found = {head: {"base": [], "site": [], "used": [], "kept": 0} for head in HEADS}
        seconds = []
        for draw in range(args.draws):
            drawn = _draw(pool, size, random.Random(1000 * size + draw))
            rest = np.array(sorted(set(range(len(everything))) - {index[s.path] for s in drawn}))
            started = time.perf_counter()
            result = adapt(model, "bench", drawn, AdaptOptions(heads=list(HEADS), include_flagged=True), cache=cache)
            seconds.append(time.perf_counter() - started)
            kept = {r.name: r for r in result.results if r.adopted}
            fitted = model.with_site("bench") if kept else model
            for head in HEADS:
                base = auc(model, head, rest)
                found[head]["base"].append(base)
                found[head]["used"].append(auc(fitted, head, rest) if head in kept else base)
                found[head]["kept"] += head in kept
            model.sites.pop("bench", None)
            # the site heads as fitted, kept or not (one cross-validation repeat: only the fit matters here)
            adapt(model, "bench", drawn, AdaptOptions(heads=list(HEADS), repeats=1, keep_all=True, include_flagged=True), cache=cache)
            for head in HEADS:
                found[head]["site"].append(auc(model.with_site("bench"), head, rest))
            model.sites.pop("bench", None)
        for head in HEADS:
            f = found[head]
            cells = [f"{np.mean(f[k]):.3f} ± {np.std(f[k]):.3f}" for k in ("base", "site", "used")]
            print(f"{size:>8} {head:<13} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {f['kept']:>2}/{args.draws} {np.mean(seconds):>8.1f}")
            if size == 60 and head == "ham10000-mel":
                ratio = np.mean(f["used"]) / np.mean(f["base"])
    if ratio is not None:
        print(f"ratio: {ratio:.4f}")


def _draw(pool: list, size: int, rng: random.Random) -> list:
    """`size` images, melanomas in their share of the pool but never fewer than adapt's minimum of 5."""
    melanomas = [s for s in pool if s.label == "melanoma"]
    others = [s for s in pool if s.label != "melanoma"]
    wanted = max(5, round(size * len(melanomas) / len(pool)))
    return rng.sample(melanomas, wanted) + rng.sample(others, size - wanted)


if __name__ == "__main__":
    main()
