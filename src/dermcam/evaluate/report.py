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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                          title: str = "") -> Path:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    import numpy as np

    plt = _pyplot()
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
    return _save(fig, path)


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Loss (left) and the headline validation metrics (right) per epoch."""
    plt = _pyplot()
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
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
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


def write_predictions(path: Path, index: Any, probs: np.ndarray, classes: Sequence[str]) -> Path:
    """``predictions.csv``: one row per image (image id, lesion id, true and predicted class, one
    probability column per class), so results can be checked and combined outside dermcam."""
    import pandas as pd

    frame = pd.DataFrame({"image_id": index["image_id"].to_numpy(), "lesion_id": index["lesion_id"].to_numpy(),
                          "true": index["dx"].to_numpy(),
                          "predicted": [classes[i] for i in np.argmax(probs, axis=1)] if len(probs) else []})
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = np.round(probs[:, k].astype(np.float64), 6) if len(probs) else []
    atomic_write_bytes(Path(path), frame.to_csv(index=False, lineterminator="\n").encode())
    return Path(path)
