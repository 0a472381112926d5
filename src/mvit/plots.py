"""Every figure mvit draws: the evaluation report, attention overlays and training curves.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), which renders with Agg
and never touches pyplot's global state or a display, so it works headless and in threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from mvit.runtime.files import written_aside



class ReliabilityBins(Protocol):
    """What a reliability figure reads (`mvit.evaluate.metrics.ReliabilityBins` has it)."""

    edges: np.ndarray  # (bins + 1,) confidence edges from 0 to 1
    accuracy: np.ndarray  # (bins,)
    count: np.ndarray  # (bins,) images per bin


class AttentionMaps(Protocol):
    """What the attention figures read (`mvit.infer.attention.AttentionMaps` has it)."""

    rgb: np.ndarray  # (H, W, 3) uint8, the whole image
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom: the part the model saw
    last_layer: np.ndarray  # (H, W)
    rollout: np.ndarray  # (H, W)
    class_specific: Optional[np.ndarray]  # (H, W), or None without a head
    head: Optional[str]
    target: Optional[str]
    per_head: np.ndarray  # (heads, H, W)
    per_layer: np.ndarray  # (layers, H, W)

DPI = 120
HEATMAP = "jet"  # red where the model looked most, blue where least: how attention maps are usually read


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


# ---- evaluation report ----------------------------------------------------------------------------


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    return _save(confusion_matrix_plot(matrix, classes), path)


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 2.0 + 0.8 * len(classes)
    figure = Figure(figsize=(size, size))
    ax = figure.add_subplot()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title("Confusion matrix (rows: true class)")
    figure.tight_layout()
    return figure


def roc_figure(
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    positive: Optional[str] = None,
    operating_point: Optional[tuple[float, float]] = None,
) -> Path:
    """Binary head: one curve for the positive class, with the stored operating point marked.
    Multi-class head: one one-vs-rest curve per class present in the targets."""
    from sklearn.metrics import RocCurveDisplay

    figure = Figure(figsize=(5.5, 5))
    ax = figure.add_subplot()
    shown = [positive] if positive is not None else list(classes)
    for name in shown:
        k = list(classes).index(name)
        is_class = targets == k
        if is_class.all() or not is_class.any():
            continue  # ROC is undefined for a class that is always or never the answer
        RocCurveDisplay.from_predictions(is_class, probabilities[:, k], name=name, ax=ax, plot_chance_level=name == shown[0])
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    if operating_point is not None:
        specificity, sensitivity = operating_point
        ax.plot([1 - specificity], [sensitivity], "o", color="black", label="stored threshold")
        ax.legend(loc="lower right")
    ax.set_title("ROC curve" + (f" ({positive} vs rest)" if positive else " (one vs rest)"))
    return _save(figure, path)


def confidence_figure(
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    positive: Optional[str] = None,
    threshold: Optional[float] = None,
) -> Path:
    """Box plots of how sure the head was, split by whether it was right. Binary head: the positive-class probability of true/false
    positives/negatives at the threshold. Multi-class head: the top-class confidence, right vs wrong."""
    figure = Figure(figsize=(6, 4.5))
    ax = figure.add_subplot()
    if positive is not None:
        k = list(classes).index(positive)
        p = probabilities[:, k]
        flagged, actual = p >= threshold, targets == k
        groups = {
            "TP": p[flagged & actual],
            "FP": p[flagged & ~actual],
            "TN": p[~flagged & ~actual],
            "FN": p[~flagged & actual],
        }
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        ax.legend(loc="best")
        ax.set_ylabel(f"P({positive})")
    else:
        confidence = probabilities.max(axis=1)
        right = probabilities.argmax(axis=1) == targets
        groups = {"correct": confidence[right], "wrong": confidence[~right]}
        ax.set_ylabel("top-class probability")
    ax.boxplot(list(groups.values()), tick_labels=[f"{name}\n(n={len(v)})" for name, v in groups.items()])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Confidence by outcome")
    return _save(figure, path)


def reliability_figure(before: ReliabilityBins, after: ReliabilityBins, path: Path, *, temperature: float) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    figure = Figure(figsize=(10, 4.5))
    for ax, table, title in zip(
        figure.subplots(1, 2), (before, after), ("before temperature scaling", f"after (T = {temperature:.3g})")
    ):
        centres = (table.edges[:-1] + table.edges[1:]) / 2
        width = table.edges[1] - table.edges[0]
        filled = table.count > 0
        bars = ax.bar(centres[filled], table.accuracy[filled], width=width * 0.95, edgecolor="black", label="accuracy")
        ax.bar_label(bars, labels=[f"n={n}" for n in table.count[filled]], fontsize=6)  # few images: a shaky bar
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"Reliability, {title}")
        ax.legend(loc="upper left")
    return _save(figure, path)


# ---- attention ------------------------------------------------------------------------------------


def overlay(rgb: np.ndarray, heatmap: np.ndarray, box: Optional[tuple[int, int, int, int]] = None, alpha: float = 0.5) -> np.ndarray:
    """RGB (H, W, 3) uint8 and a map (H, W) -> the map in colour over the image, (H, W, 3) uint8.

    The map is stretched to [0, 1] over `box` (left, top, right, bottom; default the whole image),
    the part the model saw: where it looked relative to elsewhere is what matters. Outside the box
    the image is shown dimmed, uncoloured.
    """
    left, top, right, bottom = box or (0, 0, rgb.shape[1], rgb.shape[0])
    inside = heatmap[top:bottom, left:right]
    low, high = float(inside.min()), float(inside.max())
    scaled = (inside - low) / (high - low) if high > low else np.zeros_like(inside)
    image = rgb.astype(np.float32) / 255.0
    blended = image * 0.6  # (H, W, 3): dimmed where the model did not look
    colour = colormaps[HEATMAP](scaled)[..., :3]  # (h, w, 3) in [0, 1]
    blended[top:bottom, left:right] = (1 - alpha) * image[top:bottom, left:right] + alpha * colour
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


def overlay_grid(
    rgb: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: Path, *, box: tuple[int, int, int, int], title: str, columns: int = 4
) -> Path:
    """Maps (M, H, W) -> one PNG with each map overlaid on the image, in a grid with `columns` columns."""
    rows = -(-len(maps) // columns)
    columns = min(columns, len(maps))
    aspect = rgb.shape[0] / rgb.shape[1]
    figure = Figure(figsize=(3 * columns, 3 * rows * aspect + 0.6))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, heatmap, name in zip(axes, maps, titles):
        ax.imshow(overlay(rgb, heatmap, box))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def attention_figures(maps: AttentionMaps, folder: Path, stem: str, *, title: str) -> list[Path]:
    """Three PNGs for one image: `<stem>.attention.png` (the image with the box the model saw, the
    last layer, rollout and, with a head, the class-specific map), `<stem>.heads.png` (each attention
    head of the last layer) and `<stem>.layers.png` (each layer, mean over heads)."""
    from matplotlib.patches import Rectangle

    views = [("last layer (mean over heads)", maps.last_layer), ("rollout", maps.rollout)]
    if maps.class_specific is not None:
        views.append((f"{maps.head}: {maps.target} (gradient-weighted)", maps.class_specific))
    aspect = maps.rgb.shape[0] / maps.rgb.shape[1]
    figure = Figure(figsize=(3.2 * (1 + len(views)), 3.2 * aspect + 0.6))
    axes = figure.subplots(1, 1 + len(views))
    axes[0].imshow(maps.rgb)
    left, top, right, bottom = maps.crop_box
    axes[0].add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white", linestyle="--"))
    axes[0].set_title("image (dashed: what the model saw)", fontsize=9)
    for ax, (name, heatmap) in zip(axes[1:], views):
        ax.imshow(overlay(maps.rgb, heatmap, maps.crop_box))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    paths = [_save(figure, folder / f"{stem}.attention.png")]
    heads = [f"head {k + 1}" for k in range(len(maps.per_head))]
    paths.append(overlay_grid(maps.rgb, maps.per_head, heads, folder / f"{stem}.heads.png", box=maps.crop_box, title=f"{title}: last layer, per attention head"))
    layers = [f"layer {k + 1}" for k in range(len(maps.per_layer))]
    paths.append(overlay_grid(maps.rgb, maps.per_layer, layers, folder / f"{stem}.layers.png", box=maps.crop_box, title=f"{title}: per layer, mean over heads"))
    return paths


# ---- training curves -----------------------------------------------------------------------------

CURVE_LABELS = {"balanced_accuracy": "balanced accuracy", "roc_auc": "ROC AUC", "accuracy": "accuracy"}


def plot_training_curves(history: list[dict], path: Path, metric: str = "balanced_accuracy") -> Path:
    """One row per head (loss, `metric`); dashed lines where a group was unfrozen."""
    metric = metric if metric in CURVE_LABELS else "balanced_accuracy"  # "loss" already has its column
    heads = list(history[0]["heads"]) if history else []
    fig = Figure(figsize=(10, 3 * max(1, len(heads))))
    axes = fig.subplots(max(1, len(heads)), 2, squeeze=False)
    epochs = [h["epoch"] for h in history]  # numbered from 1
    steps = [h["epoch"] for prev, h in zip(history, history[1:]) if h["unfrozen"] != prev["unfrozen"]]
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
            ax.set_title(f"{name}: {CURVE_LABELS.get(key, key)}")
            ax.set_xlabel("epoch")
            ax.legend()
    fig.suptitle("dashed lines: a backbone group unfrozen" if steps else "")
    fig.tight_layout()
    _save_aside(fig, path)
    return path


def _save_aside(fig: Figure, path: Path) -> None:
    """`fig` as a PNG at `path`, whole or not at all (`mvit.runtime.files.written_aside`): a failed or
    interrupted write leaves the previous file whole and no partial behind."""
    with written_aside(path) as partial:
        fig.savefig(partial, dpi=100, format="png")
