"""What changes during training as a pure function of where training is: learning rate, image order, parameter groups."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dermcam.train.config import TrainConfig


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, floor: float = 0.01) -> float:
    """Linear warmup, then cosine decay to ``floor``: a pure function of the step (resume-exact)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, labels: np.ndarray, seed: int, epoch: int, balance: str, num_classes: int) -> np.ndarray:
    """Positions into the train split for one epoch, drawn from (seed, epoch) alone."""
    import torch

    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    if balance == "sampler":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = torch.from_numpy(1.0 / counts[labels])
        return torch.multinomial(weights, n, replacement=True, generator=gen).numpy()
    return torch.randperm(n, generator=gen).numpy()


def param_groups(model: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone at ``lr``, the new head at ``lr * head_lr_scale``; no weight decay on norms and biases.

    The default scale is 1: with AdamW every weight moves about ``lr`` per step whatever the size of
    its gradient, so a fresh head does not need a larger rate to keep up. A metadata fusion model's head
    also includes its metadata network (fresh too): ``head_parameters()``.
    """
    head = model.head_parameters() if hasattr(model, "head_parameters") else model.get_classifier().parameters()
    head_ids = {id(p) for p in head}
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = id(param) in head_ids
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((is_head, no_decay), []).append(param)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        base_lr = config.lr * (config.head_lr_scale if is_head else 1.0)
        out.append({"params": params, "lr": base_lr, "base_lr": base_lr,
                    "weight_decay": 0.0 if no_decay else config.weight_decay})
    return out
