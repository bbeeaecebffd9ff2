"""How faithful a map is: deletion and insertion AUC (Petsiuk et al. 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError
from dermcam.explain.cam import Target, as_input, model_device, preserved_model, resolve_targets

if TYPE_CHECKING:
    import torch


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """A strong blur (sigma ~ size/45, 5 px at 224) used as the 'nothing inserted yet' image."""
    import torch
    import torch.nn.functional as F

    sigma = max(1.0, max(x.shape[-2:]) / 45)
    radius = min(int(round(2 * sigma)), min(x.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def faithfulness(model: torch.nn.Module, x: torch.Tensor, cam_map: np.ndarray, target: Target = None,
                 steps: int = 20, batch_size: int = 32) -> dict[str, Any]:
    """Deletion and insertion AUC of maps (Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421).

    Pixels are ranked by the map. *Deletion* replaces the top-ranked fraction (0, 1/steps, ..., 1)
    with 0 (the data set's mean colour after normalisation) and records the target probability:
    a faithful map makes it fall fast, so **lower deletion AUC is better**. *Insertion* starts from
    a blurred copy and puts back the top-ranked pixels: **higher insertion AUC is better**. Each AUC
    is the trapezoidal area under probability vs fraction, in [0, 1]. Costs 2 x (steps + 1)
    forwards per image. ``x``: (B, 3, H, W); ``cam_map``: (B, H, W) at the same size; ``target``
    as for :class:`CAM` (default: predicted class). Returns per-image lists.
    """
    import torch

    maps = np.asarray(cam_map, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != x.shape[0] or maps.shape[1:] != tuple(x.shape[-2:]):
        raise BadInputError(f"cam_map must be shaped (B, H, W) = ({x.shape[0]}, {x.shape[2]}, {x.shape[3]}), "
                            f"got {maps.shape}")
    if steps < 1:
        raise BadInputError("steps must be at least 1")
    device = model_device(model)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    result: dict[str, Any] = {"steps": steps, "deletion_auc": [], "insertion_auc": [],
                              "deletion_curve": [], "insertion_curve": []}
    with preserved_model(model), torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        inputs = as_input(x, device)
        targets = resolve_targets(target, model(inputs).float())
        blurred = _gaussian_blur(inputs)
        num_pixels = inputs.shape[-2] * inputs.shape[-1]
        counts = torch.as_tensor(np.round(fractions * num_pixels).astype(np.int64), device=device)
        for image, blur, saliency, cls in zip(inputs, blurred, maps, targets):
            order = torch.as_tensor(np.argsort(-saliency.ravel(), kind="stable"), device=device)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_pixels, device=device)
            # (steps+1, 1, H, W): True where the pixel is among the top-ranked fraction at that step
            chosen = (rank[None] < counts[:, None]).view(steps + 1, 1, *inputs.shape[-2:])
            for kind, start, end in (("deletion", image, torch.zeros_like(image)), ("insertion", blur, image)):
                probs = []
                for part in chosen.split(batch_size):
                    batch = torch.where(part, end[None], start[None])
                    probs.append(model(batch).float().softmax(1)[:, cls])
                curve = torch.cat(probs).cpu().numpy().astype(float)
                result[f"{kind}_curve"].append(curve.tolist())
                result[f"{kind}_auc"].append(float(((curve[:-1] + curve[1:]) / 2).sum() / steps))
    return result
