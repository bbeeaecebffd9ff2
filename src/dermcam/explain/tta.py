"""Prediction for explain, and test-time augmentation over the four flips (probabilities and maps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dermcam.data.geometry import FLIP_DIMS
from dermcam.explain.cam import CAM, CAMResult, Target, as_input, model_device, preserved_model, resolve_targets

if TYPE_CHECKING:
    import torch


def predict(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities), each (B, K) float32, in fp32 eval mode without gradients; the model
    is left as found. ``tta`` averages over the four flips (probabilities averaged as probabilities)."""
    import torch

    device = model_device(model)
    with preserved_model(model), torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        inputs = as_input(x, device)
        flips = FLIP_DIMS if tta else FLIP_DIMS[:1]
        per_flip = torch.stack([model(inputs.flip(d) if d else inputs).float() for d in flips])
        logits, probs = per_flip.mean(0), per_flip.softmax(2).mean(0)
    return logits.cpu().numpy(), probs.cpu().numpy()


def tta_cam(cam: CAM, x: torch.Tensor, target: Target) -> CAMResult:
    """Flip-averaged CAM: predictions first (to fix the class), then one map per flip."""
    import torch

    logits, probs = predict(cam.model, x, tta=True)
    targets = resolve_targets(target, torch.from_numpy(probs))
    maps = []
    for dims in FLIP_DIMS:
        result = cam(x.flip(dims) if dims else x, targets)
        maps.append(np.flip(result.maps, axis=tuple(d - 1 for d in dims)) if dims else result.maps)
    mean = np.mean(maps, axis=0)
    low = mean.min(axis=(1, 2), keepdims=True)
    high = (mean - low).max(axis=(1, 2), keepdims=True)
    mean = ((mean - low) / (high + 1e-7)).astype(np.float32)
    return CAMResult(maps=np.ascontiguousarray(mean), logits=logits, probs=probs, targets=targets,
                     method=cam.name, layer=cam.layer_name)
