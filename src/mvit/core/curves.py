"""Training curves: loss and the selection metric per head, train against validation (and the
weights' moving average, where there is one), unfreezing steps marked.

Built on matplotlib's object API (`Figure`), which renders with Agg without touching pyplot's
global backend, so importing the trainer in a notebook leaves the user's backend alone.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

LABELS = {"balanced_accuracy": "balanced accuracy", "roc_auc": "ROC AUC", "accuracy": "accuracy"}


def plot_training_curves(history: list[dict], path: Path, metric: str = "balanced_accuracy") -> Path:
    """One row per head (loss, `metric`); dashed lines where a group was unfrozen."""
    metric = metric if metric in LABELS else "balanced_accuracy"  # "loss" already has its column
    heads = list(history[0]["heads"]) if history else []
    fig = Figure(figsize=(10, 3 * max(1, len(heads))))
    axes = fig.subplots(max(1, len(heads)), 2, squeeze=False)
    epochs = [h["epoch"] + 1 for h in history]
    steps = [h["epoch"] + 1 for prev, h in zip(history, history[1:]) if h["unfrozen"] != prev["unfrozen"]]
    for row, name in zip(axes, heads):
        for ax, key in ((row[0], "loss"), (row[1], metric)):
            for split, style in (("train", "-"), ("valid", "-o")):
                values = [h["heads"][name][split].get(key, float("nan")) for h in history]
                ax.plot(epochs, values, style, label=split, markersize=3)
            if any("ema" in h for h in history):
                values = [h["ema"]["heads"][name]["valid"].get(key, float("nan")) if "ema" in h else float("nan") for h in history]
                ax.plot(epochs, values, ":s", label="valid, weight average", markersize=3)
            for step in steps:
                ax.axvline(step - 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{name}: {LABELS.get(key, key)}")
            ax.set_xlabel("epoch")
            ax.legend()
    fig.suptitle("dashed lines: a backbone group unfrozen" if steps else "")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=100)
    partial.replace(path)
    return path
