"""How much a lower precision moves predictions: fp32 against bf16 or int8 on the test split of real datasets.

Runs heads over the images of a split twice, in float32 and in `--compare` (bf16 autocast, or the
int8 backbone of `mvit.infer.quantize`), and reports per head: the images whose decided label
changes (with each binary head's stored threshold, as `mvit predict` decides), the largest and mean
change in calibrated probability, and the ROC AUC against the true labels in both precisions (binary:
the positive class; multi-class: one-vs-rest macro, as `mvit evaluate` reports it). Heads that read
the same images share one pass. Ends with `ratio: <the largest fraction of images whose label changed, over the heads>`.

    .venv/bin/python bench/precision_agreement.py --compare int8 [--model FILE] [--data ../shared/data] \\
        [--heads dermmel,ham10000,ham10000-mel] [--split test] [--limit N]

Default model: the bundled one (mvit.load()); each head reads its dataset's folder under --data
(dermmel, ham10000, ph2). bf16 is emulated, several times slower than fp32, on CPUs without AMX.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mvit.runtime.options import loader_workers
from mvit.evaluate.evaluation_set import evaluation_set, split_settings
from mvit.evaluate.metrics import classification_metrics
from mvit.core import model_file
from mvit.infer.predict import predict_stream
from mvit.runtime.options import RunOptions
from mvit.registry import manager

GOAL_AGREEMENT, GOAL_AUC = 0.99, 0.005  # issue 13's goals for int8 against fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="folder holding one folder per dataset (dermmel, ham10000, ...)")
    parser.add_argument("--heads", default="dermmel,ham10000,ham10000-mel")
    parser.add_argument("--split", default="test")
    parser.add_argument("--compare", default="int8", choices=["bf16", "int8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split only (a quick look)")
    args = parser.parse_args()

    model = model_file.load(args.model, device=args.device)
    groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}  # the split's paths -> [(head, true class indices)]
    for head in args.heads.split(","):
        model.select_heads(head)  # one sentence for a head the model lacks
        dataset = manager.get_head(head).dataset
        chosen = evaluation_set(head, dataset, Path(args.data) / dataset, args.split, split_settings(model.provenance, dataset))
        items = chosen.items[: args.limit]
        groups.setdefault(tuple(str(sample.path) for sample, _ in items), []).append((head, np.array([t for _, t in items])))

    print(f"model {args.model or 'bundled'}, {args.split} split, device {args.device}, batch {args.batch_size}: "
          f"fp32 against {args.compare}")
    print(f"{'head':<14}{'images':>7}{'labels same':>13}{'max |dp|':>10}{'mean |dp|':>11}"
          f"{'AUC fp32':>10}{'AUC ' + args.compare:>10}{'dAUC':>9}")
    worst, goals_met = 0.0, True
    for paths, heads in groups.items():
        names = [head for head, _ in heads]
        workers = loader_workers(len(paths), args.batch_size, model.device)
        results, seconds = {}, {}
        for precision in ("fp32", args.compare):
            start = time.perf_counter()
            results[precision] = [r for r in predict_stream(model, list(paths), names, run=RunOptions(precision, args.batch_size, workers))]
            seconds[precision] = time.perf_counter() - start
        for head, targets in heads:
            info = model.heads[head]
            positive = info.positive if info.is_binary else None
            ok = [k for k, (a, b) in enumerate(zip(results["fp32"], results[args.compare])) if a.error is None and b.error is None]
            at = {p: [next(x for x in results[p][k].predictions if x.head == head) for k in ok] for p in results}
            probabilities = {p: np.array([[x.probabilities[c] for c in info.classes] for x in at[p]]) for p in at}
            same = np.mean([a.label == b.label for a, b in zip(at["fp32"], at[args.compare])])
            moved = np.abs(probabilities["fp32"] - probabilities[args.compare])
            auc = {p: classification_metrics(probabilities[p], targets[ok], info.classes, positive, info.threshold)["roc_auc"]
                   for p in at}
            worst = max(worst, 1 - same)
            if None in auc.values():  # a class without images in the split (e.g. under --limit)
                goals_met, shown = False, f"{'n/a':>10}{'n/a':>10}{'n/a':>9}"
            else:
                difference = auc[args.compare] - auc["fp32"]
                goals_met &= same >= GOAL_AGREEMENT and abs(difference) <= GOAL_AUC
                shown = f"{auc['fp32']:>10.4f}{auc[args.compare]:>10.4f}{difference:>+9.4f}"
            print(f"{head:<14}{len(ok):>7}{100 * same:>12.2f}%{moved.max():>10.4f}{moved.mean():>11.5f}{shown}")
        if model.ood_gate is not None:  # the gate's verdict on each image, from the same pass
            verdicts = [(a.predictions[0].in_distribution, b.predictions[0].in_distribution)
                        for a, b in zip(results["fp32"], results[args.compare]) if a.error is None and b.error is None]
            scores = np.array([[a.predictions[0].ood_score, b.predictions[0].ood_score]
                               for a, b in zip(results["fp32"], results[args.compare]) if a.error is None and b.error is None])
            print(f"  gate verdict changed on {sum(x != y for x, y in verdicts)} of {len(verdicts)} images "
                  f"(score change: max {np.abs(scores[:, 0] - scores[:, 1]).max():.3f}, threshold {model.ood_gate.threshold:.3f})")
        print(f"  ({', '.join(names)}: fp32 {len(paths) / seconds['fp32']:.1f} images/s, "
              f"{args.compare} {len(paths) / seconds[args.compare]:.1f} images/s, end to end)")
    if args.compare == "int8":
        print(f"goals (labels same >= {100 * GOAL_AGREEMENT:.0f}%, |dAUC| <= {GOAL_AUC}) on every head: "
              f"{'met' if goals_met else 'NOT met'}")
    print(f"ratio: {worst:.4f}")


if __name__ == "__main__":
    main()
