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


class DistillationLoss:
    """Knowledge distillation (Hinton et al. 2015) with the true labels:
    ``(1 - alpha) * hard + alpha * T^2 * KL(teacher_T || student_T)``.

    ``hard`` is the run's usual :class:`WeightedCrossEntropy`. The soft targets are the teacher's
    *calibrated* probabilities ``p`` (not logits: an ensemble's answer is a mean of probabilities), so
    the teacher at temperature T is ``p^(1/T)`` renormalised (which is ``softmax(logits / T)`` for a
    single calibrated model), and the student's is ``softmax(logits / T)``. ``T^2`` keeps the soft
    term's gradients the size of the hard term's whatever T is (they scale as 1/T^2).

    The KL term of each sample is weighted like the hard term, by its true class's weight and divided by
    the batch's weight sum: the whole loss stays one weighted mean with the per-sample weights that
    distributed training's loss scaling (:meth:`dermcam.train.trainer.Trainer.loss_scale`) assumes, and
    the class balancing the hard loss does applies to what the student learns from the teacher too.
    A zero in ``p`` contributes nothing (``0 log 0 = 0``), never NaN.
    """

    def __init__(self, hard: WeightedCrossEntropy, temperature: float, alpha: float) -> None:
        self.hard = hard
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def soft_term(self, logits: Any, target: Any, soft: Any) -> Any:
        """``T^2 * KL(teacher_T || student_T)``, the weighted mean over the batch (0 for identical answers)."""
        import torch

        t = self.temperature
        teacher_log = torch.log_softmax(torch.log(soft.float()) / t, dim=1)  # log p^(1/T), renormalised; -inf at 0
        teacher = teacher_log.exp()
        student_log = torch.log_softmax(logits.float() / t, dim=1)
        # sum_k q_k (log q_k - log s_k), with q_k = 0 contributing 0 (xlogy) instead of 0 * -inf
        per_sample = (torch.xlogy(teacher, teacher) - teacher * student_log).sum(dim=1) * (t * t)
        weights = self.hard.class_weights
        if weights is None:
            return per_sample.mean()
        w = weights[target]
        return (per_sample * w).sum() / w.sum()

    def __call__(self, logits: Any, target: Any, soft: Any | None = None) -> Any:
        hard = self.hard(logits, target)
        if soft is None or self.alpha == 0.0:  # alpha 0: exactly the hard loss (and no soft term's NaN risk)
            return hard
        soft_loss = self.soft_term(logits, target, soft)
        if self.alpha == 1.0:
            return soft_loss
        return (1.0 - self.alpha) * hard + self.alpha * soft_loss
