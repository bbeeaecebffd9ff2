"""Classification metrics that mean something on an imbalanced medical data set.

HAM10000 is ~75% nv: a model that always answers "nv" scores 75% accuracy and 0% melanoma recall.
So every report leads with balanced accuracy, macro F1, per-class recall and one-vs-rest AUC;
accuracy is kept only for comparison.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    scored: Sequence[int] | None = None) -> dict[str, Any]:
    """All metrics for predictions ``probs`` (N, K) against integer labels ``y_true`` (N,).

    Per-class keys use the class code: ``recall_mel``, ``precision_mel``, ``f1_mel``, ``auc_mel``.
    AUC of a class absent from ``y_true`` is undefined and reported as None (never faked).
    ``scored``: the class indices macro F1 averages over (default: all). An external set that lacks
    one of the model's classes is scored on the classes it has: a zero F1 for a class nobody could
    get right would say nothing about the model.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(_balanced_accuracy(y_true, y_pred, labels)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(scored) if scored is not None else labels,
                                   average="macro", zero_division=0)),
    }
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    aucs: list[float] = []
    for k, code in enumerate(classes):
        out[f"recall_{code}"] = float(recall[k])
        out[f"precision_{code}"] = float(precision[k])
        out[f"f1_{code}"] = float(f1[k])
        out[f"support_{code}"] = int(support[k])
        positives = y_true == k
        if positives.any() and (~positives).any():
            auc = float(roc_auc_score(positives, probs[:, k]))
            aucs.append(auc)
            out[f"auc_{code}"] = auc
        else:
            out[f"auc_{code}"] = None
    out["auc_macro"] = float(np.mean(aucs)) if aucs else None
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int]) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition, without its warning)."""
    present = [k for k in labels if (y_true == k).any()]
    if not present:
        return 0.0
    return float(np.mean([(y_pred[y_true == k] == k).mean() for k in present]))


def cross_entropy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood (the val loss, without label smoothing)."""
    picked = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    # + 0.0: when every picked probability is 1.0, -log(1) is -0.0, which JSON and reports would show as "-0"
    return float(-np.log(picked).mean()) + 0.0


def format_value(value: Any, digits: int = 3) -> str:
    """A number as the terminal and report.html show it: ``0.781``; whole numbers as they are; ``-`` for
    a missing or undefined (NaN, infinite) value. Never ``-0.000``: a tiny negative value (rounding noise
    such as -1e-7, or -0.0) reads as a real negative score, so what rounds to zero prints unsigned."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "-" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if not math.isfinite(value):
        return "-"
    text = f"{float(value):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text
