"""The training loss: class-weighted, label-smoothed cross-entropy as a true per-sample weighted mean."""

from __future__ import annotations

from typing import Any

import numpy as np


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights with mean 1 over samples: each class counts equally in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class WeightedCrossEntropy:
    """Label-smoothed cross-entropy where each sample counts with its class weight.

    ``torch.nn.CrossEntropyLoss(weight=..., label_smoothing=...)`` also weights the smoothing term of
    every sample by the weights of the *other* classes, which inflates the loss of frequent classes'
    samples by the rare classes' weights. Here the smoothed per-sample loss is multiplied by the
    weight of the sample's own class and normalised by the batch's weight sum, so the weighted loss is
    a plain weighted mean (what distributed training's loss scaling assumes).
    """

    def __init__(self, class_weights: Any | None, label_smoothing: float) -> None:
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing

    def __call__(self, logits: Any, target: Any) -> Any:
        import torch.nn.functional as F

        per_sample = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
        if self.class_weights is None:
            return per_sample.mean()
        weights = self.class_weights[target]
        return (per_sample * weights).sum() / weights.sum()
