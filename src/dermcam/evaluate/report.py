"""Evaluation reports: metrics JSON, a confusion matrix and per-epoch curves as PNG.

People read a confusion matrix faster than a table of recalls, so reports are pictures first.
matplotlib (Agg backend, imported only here) draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.store.files import atomic_path, atomic_write_bytes, atomic_write_json


def pyplot() -> Any:
    """matplotlib on the Agg backend, imported on first use (no display, and `--help` never loads it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                          title: str = "") -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    import numpy as np

    plt = pyplot()
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.3 * len(classes) + 2, 1.1 * len(classes) + 1.5), dpi=120)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), labels=classes)
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}\n{normalised[i, j]:.0%}", ha="center", va="center",
                    color=colour, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall (row-normalised)")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Loss (left) and the headline validation metrics (right) per epoch."""
    plt = pyplot()
    epochs = [h["epoch"] + 1 for h in history]  # people count epochs from 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            left.plot(epochs, values, marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    for key, label in (("val_balanced_accuracy", "balanced accuracy"), ("val_macro_f1", "macro F1"),
                       ("val_recall_mel", "melanoma recall"), ("val_auc_macro", "AUC (macro)")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            right.plot(epochs, values, marker="o", label=label)
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation")
    right.legend(loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(y_true: np.ndarray, raw: np.ndarray, calibrated: np.ndarray | None, path: Path,
                     title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin (15 equal-width bins of the top-label
    probability), raw and calibrated side by side, ECE in each title; a perfect model lies on the
    diagonal. Bar width shows where images are (the few images of an empty-looking bin say little)."""
    from dermcam.evaluate.calibration import BINS, expected_calibration_error, reliability_bins

    plt = pyplot()
    panels = [("raw", raw)] + ([("calibrated", calibrated)] if calibrated is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), dpi=120, squeeze=False)
    edges = np.linspace(0, 1, BINS + 1)
    for ax, (name, probs) in zip(axes[0], panels):
        bins = reliability_bins(y_true, probs)
        share = bins["count"] / max(bins["count"].sum(), 1)
        filled = bins["count"] > 0
        ax.bar(edges[:-1][filled], bins["accuracy"][filled], width=1 / BINS, align="edge", alpha=0.8,
               color="tab:blue", edgecolor="white", label="accuracy")
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="tab:blue", markersize=3)
        ax.bar(edges[:-1], share, width=1 / BINS, align="edge", color="grey", alpha=0.3, label="share of images")
        ax.plot([0, 1], [0, 1], "--", color="black", linewidth=1, label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {expected_calibration_error(y_true, probs):.3f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_class_curves(kind: str, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path,
                      operating_point: dict[str, Any] | None = None, title: str = "") -> Path:
    """One-vs-rest ROC (``kind="roc"``) or precision-recall (``"pr"``) curve per class, with the
    operating point (its threshold on its class's probability) marked on that class's curve.
    A class without positives or negatives in the set has no curve."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    y_true = np.asarray(y_true)
    for c, name in enumerate(classes):
        positive = y_true == c
        if not positive.any() or positive.all():
            continue
        scores = probs[:, c]
        if kind == "roc":
            x, y, _ = roc_curve(positive, scores)
            line, = ax.plot(x, y, label=f"{name} (AUC {roc_auc_score(positive, scores):.3f})")
        else:
            precision, recall, _ = precision_recall_curve(positive, scores)
            x, y = recall, precision
            line, = ax.plot(x, y, label=f"{name} (AP {average_precision_score(positive, scores):.3f})")
        if operating_point is not None and operating_point["class"] == name:
            called = scores >= operating_point["threshold"]
            sensitivity = called[positive].mean()
            point = ((1 - (~called[~positive]).mean(), sensitivity) if kind == "roc"
                     else (sensitivity, called[positive].sum() / max(called.sum(), 1)))
            ax.plot(*point, "o", markersize=8, markerfacecolor="none", markeredgewidth=2, color=line.get_color(),
                    label=f"operating point {name} >= {operating_point['threshold']:.3f}")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("sensitivity (recall)")
    else:
        ax.set_xlabel("recall (sensitivity)")
        ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
    ax.set_title(title or ("ROC" if kind == "roc" else "precision-recall"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_probability_plots(out_dir: Path, y_true: np.ndarray, raw: np.ndarray, outputs: Any,
                            title: str = "") -> list[Path]:
    """reliability.png (raw vs calibrated), roc.png and pr.png (operating point marked), and with an
    operating point confusion_matrix_operating_point.png (its decisions)."""
    out_dir = Path(out_dir)
    point, classes = outputs.operating_point, outputs.classes
    files = [plot_reliability(y_true, raw, outputs.probs if outputs.calibration else None,
                              out_dir / "reliability.png", title),
             plot_class_curves("roc", y_true, outputs.probs, classes, out_dir / "roc.png", point, title),
             plot_class_curves("pr", y_true, outputs.probs, classes, out_dir / "pr.png", point, title)]
    if point is not None:
        from sklearn.metrics import confusion_matrix

        matrix = confusion_matrix(y_true, outputs.decisions, labels=list(range(len(classes))))
        files.append(plot_confusion_matrix(matrix, classes, out_dir / "confusion_matrix_operating_point.png",
                                           f"{title}\noperating point {point['class']} >= {point['threshold']:.3f}"))
    return files


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure as PNG atomically and free it (the audit's charts use this too)."""
    plt = pyplot()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_report(out_dir: Path, metrics: dict[str, Any], classes: Sequence[str], *, title: str = "",
                 history: Sequence[dict[str, Any]] | None = None) -> list[Path]:
    """metrics.json + confusion_matrix.png (+ curves.png when a training history is given)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", metrics)
    files = [out_dir / "metrics.json",
             plot_confusion_matrix(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png", title)]
    if history:
        files.append(plot_curves(history, out_dir / "curves.png", title))
    return files


def write_predictions(path: Path, index: Any, probs: np.ndarray, classes: Sequence[str],
                      decisions: np.ndarray | None = None) -> Path:
    """``predictions.csv``: one row per image (image id, lesion id, true and predicted class, one
    probability column per class), so results can be checked and combined outside dermcam.
    ``decisions`` (an operating point's) add a ``decision`` column beside the argmax ``predicted``."""
    import pandas as pd

    frame = pd.DataFrame({"image_id": index["image_id"].to_numpy(), "lesion_id": index["lesion_id"].to_numpy(),
                          "true": index["dx"].to_numpy(),
                          "predicted": [classes[i] for i in np.argmax(probs, axis=1)] if len(probs) else []})
    if decisions is not None:
        frame["decision"] = [classes[i] for i in decisions]
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = np.round(probs[:, k].astype(np.float64), 6) if len(probs) else []
    atomic_write_bytes(Path(path), frame.to_csv(index=False, lineterminator="\n").encode())
    return Path(path)
