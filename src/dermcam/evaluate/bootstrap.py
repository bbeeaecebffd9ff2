"""95% confidence intervals for the headline metrics, by bootstrapping lesions, not images.

Several images of one lesion are not independent evidence: resampling images would make the
intervals too narrow. So each resample draws *groups* (lesions, else patients, else single images,
the same key the split used) with replacement, and every image counts as often as its group was drawn.

Everything is vectorised over resamples: a resample is a row of per-image weights ``W`` (R x N), the
confusion matrices of all resamples are one matrix product, and the one-vs-rest AUCs come from one
sort per class plus cumulative sums (a weighted Mann-Whitney statistic, ties counted half). 1,000
resamples of 2,000 images take well under a second (benchmarks/bench_bootstrap.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Intervals:
    """Percentile intervals of each metric over the resamples (None where a metric was undefined)."""

    ci: dict[str, list[float] | None]
    resamples: int
    level: float
    unit: str  # what was resampled: "lesion" (or patient / image groups)

    def to_dict(self) -> dict[str, object]:
        return {"level": self.level, "resamples": self.resamples, "unit": self.unit, "intervals": self.ci}


def group_weights(groups: Sequence[str], resamples: int, seed: int) -> np.ndarray:
    """(R, N) float weights: how often each image's group was drawn in each resample."""
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_groups, 1), size=(resamples, n_groups))
    offsets = (np.arange(resamples)[:, None] * n_groups + draws).ravel()
    counts = np.bincount(offsets, minlength=resamples * n_groups).reshape(resamples, n_groups)
    return counts[:, index].astype(np.float64)


def weighted_metrics(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                     classes: Sequence[str], scored: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The headline metrics of every resample at once: each value is an (R,) array (NaN = undefined).

    ``weights`` (R, N); ``scored``: the class indices that balanced accuracy and macro F1 average over
    (default: all). With all weights 1 this equals :func:`dermcam.evaluate.metrics.compute_metrics`.
    """
    k = len(classes)
    scored = list(range(k)) if scored is None else list(scored)
    y_true = np.asarray(y_true, dtype=np.int64)
    confusion = weighted_confusion(y_true, np.asarray(probs).argmax(axis=1), weights, k)
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)), 0.0)
    out: dict[str, np.ndarray] = {
        "balanced_accuracy": _row_mean(np.where(support[:, scored] > 0, recall[:, scored], np.nan)),
        "macro_f1": f1[:, scored].mean(axis=1) if scored else np.full(len(weights), np.nan),
    }
    aucs = []
    for c, name in enumerate(classes):
        out[f"recall_{name}"] = recall[:, c]
        out[f"precision_{name}"] = np.where(predicted[:, c] > 0, precision[:, c], np.nan)
        out[f"auc_{name}"] = weighted_auc(probs[:, c], y_true == c, weights)
        aucs.append(out[f"auc_{name}"])
    out["auc_macro"] = _row_mean(np.stack(aucs, axis=1))
    return out


def weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """(R, true, predicted) confusion matrices of every resample at once: one matrix product.

    ``y_pred`` is any decision (the argmax, or an operating point's rule); ``weights`` (R, N).
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cells = np.zeros((len(y_true), k * k))
    cells[np.arange(len(y_true)), y_true * k + y_pred] = 1.0
    return (weights @ cells).reshape(-1, k, k)


def _row_mean(values: np.ndarray) -> np.ndarray:
    """Mean of the finite entries of each row; NaN for a row with none (no warning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per row of ``weights`` (R, N): the weighted probability that a positive
    scores above a negative, ties counted half. NaN where a row has no positive or no negative."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, pos = np.asarray(scores)[order], np.asarray(positive)[order]
    w = weights[:, order]
    w_neg = w * ~pos
    # Tie blocks: images with equal scores share one block; a positive sees the negatives of lower
    # blocks fully and the negatives of its own block half.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    block = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    ends = np.r_[starts[1:], len(sorted_scores)]
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w_neg, axis=1)], axis=1)
    below = cum[:, starts[block]]
    tied = cum[:, ends[block]] - below
    total_pos = (w * pos).sum(axis=1)
    total_neg = w_neg.sum(axis=1)
    wins = ((w * pos) * (below + 0.5 * tied)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0), wins / (total_pos * total_neg), np.nan)


def confidence_intervals(y_true: np.ndarray, probs: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                         *, scored: Sequence[int] | None = None, resamples: int = DEFAULT_RESAMPLES,
                         seed: int = 0, level: float = LEVEL, unit: str = "lesion") -> Intervals:
    """Percentile bootstrap intervals of every headline metric, resampling ``groups``."""
    weights = group_weights(groups, resamples, seed)
    values = weighted_metrics(y_true, probs, weights, classes, scored)
    return Intervals(percentile_intervals(values, level), resamples, level, unit)


def paired_intervals(y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, groups: Sequence[str],
                     classes: Sequence[str], *, scored: Sequence[int] | None = None,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL,
                     unit: str = "lesion") -> Intervals:
    """Percentile intervals of each metric's difference ``b - a`` for two models' predictions of the
    same images, both measured on every resample of one draw of ``groups``.

    Why paired: two models scored on the same images share most of their sampling noise (a resample
    full of easy lesions is easy for both), so their separate intervals overlap even when one is
    better on nearly every resample. Measuring both on the same resampled groups cancels that shared
    part; an interval of the difference that excludes 0 says which is better on this data. With the
    same ``seed``, :func:`confidence_intervals` of either model uses the same draws.
    """
    if np.shape(probs_a) != np.shape(probs_b) or len(probs_a) != len(y_true):
        raise ValueError("paired intervals need both models' probabilities for the same images")
    weights = group_weights(groups, resamples, seed)
    a = weighted_metrics(y_true, probs_a, weights, classes, scored)
    b = weighted_metrics(y_true, probs_b, weights, classes, scored)
    return Intervals(percentile_intervals({k: b[k] - a[k] for k in a}, level), resamples, level, unit)


def percentile_intervals(values: dict[str, np.ndarray], level: float = LEVEL) -> dict[str, list[float] | None]:
    """Percentile interval of each metric's (R,) resampled values (NaN = undefined in that resample)."""
    tail = (1 - level) / 2 * 100
    ci: dict[str, list[float] | None] = {}
    for name, samples in values.items():
        finite = samples[np.isfinite(samples)]
        # A metric undefined in more than 5% of resamples (a class with one lesion) gets no interval.
        if len(finite) < 0.95 * len(samples) or not len(finite):
            ci[name] = None
        else:
            low, high = np.percentile(finite, [tail, 100 - tail])
            ci[name] = [round(float(low), 6), round(float(high), 6)]
    return ci
