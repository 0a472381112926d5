"""Training curves: loss and accuracy per head, train against validation, unfreezing steps marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], path: Path) -> Path:
    """One row per head (loss, balanced accuracy); dashed lines where a group was unfrozen."""
    heads = list(history[0]["heads"]) if history else []
    fig, axes = plt.subplots(max(1, len(heads)), 2, figsize=(10, 3 * max(1, len(heads))), squeeze=False)
    epochs = [h["epoch"] + 1 for h in history]
    steps = [h["epoch"] + 1 for prev, h in zip(history, history[1:]) if h["unfrozen"] != prev["unfrozen"]]
    for row, name in zip(axes, heads):
        for ax, metric, label in ((row[0], "loss", "loss"), (row[1], "balanced_accuracy", "balanced accuracy")):
            for split, style in (("train", "-"), ("valid", "-o")):
                values = [h["heads"][name][split].get(metric, float("nan")) for h in history]
                ax.plot(epochs, values, style, label=split, markersize=3)
            for step in steps:
                ax.axvline(step - 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{name}: {label}")
            ax.set_xlabel("epoch")
            ax.legend()
    fig.suptitle("dashed lines: a backbone group unfrozen" if steps else "")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(path)
    return path
