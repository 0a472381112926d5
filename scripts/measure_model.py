"""Every figure docs/results.md reports for a bundled-model candidate, in one run.

    python scripts/measure_model.py MODEL.safetensors --out runs/measure/NAME [--ph2-cv STAGE2.toml]

- in-domain test splits: `dermmel`, `ham10000` and `ham10000-mel` on their held-out test splits
  (the splits recorded in the model file), as `mvit evaluate --head H --root DIR` does;
- cross-clinic: `ham10000-mel` and `dermmel` on all 150 PH2 images, as
  `mvit evaluate --head H --dataset ph2 --split all` does (PH2 is never seen by stage 1);
- with `--ph2-cv`: PH2's 3-class and melanoma heads, 5-fold cross-validated on the frozen backbone
  of MODEL (stage 2 trained per fold with the given config, then its held-out fold evaluated).

Writes every report under --out and a summary.json, and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_DOMAIN = [("dermmel", "dermmel"), ("ham10000", "ham10000"), ("ham10000-mel", "ham10000")]
CROSS_CLINIC = ["ham10000-mel", "dermmel"]
KEYS = ("n", "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "ece", "brier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA, help="the folder holding ham10000/, dermmel/, ph2/")
    parser.add_argument("--ph2-cv", type=Path, default=None, help="stage-2 config: cross-validate the PH2 heads")
    args = parser.parse_args()

    import mvit
    from mvit.evaluate.report import evaluate_head

    if not (args.data / "ph2").is_dir():
        sys.exit(f"no datasets under {args.data}; pass --data")
    model = mvit.load(args.model)
    summary: dict = {"model": str(args.model), "in_domain": {}, "cross_clinic": {}, "ph2_cv": {}}

    def keep(metrics: dict) -> dict:
        row = {key: metrics.get(key) for key in KEYS}
        if metrics.get("ood"):
            row["gate_accepted_fraction"] = metrics["ood"]["accepted_fraction"]
            accepted = metrics["ood"]["metrics_on_accepted"] or {}
            row["roc_auc_on_accepted"] = accepted.get("roc_auc")
        return row

    for head, dataset in IN_DOMAIN:
        metrics = evaluate_head(model, head, args.data / dataset, args.out / "test" / head)
        summary["in_domain"][head] = keep(metrics)
    for head in CROSS_CLINIC:
        metrics = evaluate_head(model, head, args.data / "ph2", args.out / "ph2-all" / head, dataset="ph2", split="all")
        summary["cross_clinic"][head] = keep(metrics)
    if args.ph2_cv:
        summary["ph2_cv"] = ph2_cross_validation(args.model, args.ph2_cv, args.data / "ph2", args.out / "ph2-cv")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))


def ph2_cross_validation(model: Path, config: Path, root: Path, out: Path) -> dict:
    """Stage 2 on each fold's training images (frozen backbone), scored on the held-out fold."""
    import mvit
    from mvit.train import trainer as training
    from mvit.train.config import load_config
    from mvit.evaluate.report import evaluate_head

    folds: dict[str, list[dict]] = {"ph2": [], "ph2-mel": []}
    for k in range(5):
        run = out / f"fold-{k}"
        overrides = [f'backbone.init="{model.resolve()}"', f"datasets.0.fold={k}", f'output="{run.resolve()}"',
                     f'datasets.0.root="{root.resolve()}"']
        best = training.train(load_config(config, overrides))
        fold_model = mvit.load(best)
        for head in folds:
            folds[head].append(evaluate_head(fold_model, head, root, run / f"eval-{head}"))
    result = {}
    for head, runs in folds.items():
        result[head] = {}
        for key in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                result[head][key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return result


def table(summary: dict) -> str:
    def f(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| measure | head | images | accuracy | balanced acc. | ROC AUC | sensitivity | specificity | gate accepts | AUC on accepted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for where, rows in (("test split", summary["in_domain"]), ("all PH2", summary["cross_clinic"])):
        for head, row in rows.items():
            lines.append(f"| {where} | `{head}` | {row['n']} | {f(row['accuracy'])} | {f(row['balanced_accuracy'])} | "
                         f"{f(row['roc_auc'])} | {f(row['sensitivity'])} | {f(row['specificity'])} | "
                         f"{f(row.get('gate_accepted_fraction'))} | {f(row.get('roc_auc_on_accepted'))} |")
    for head, row in summary["ph2_cv"].items():
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['sd']:.3f}" if k in row else "-"
                 for k in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")]
        lines.append(f"| PH2 5-fold CV | `{head}` | 5 x 30 | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
