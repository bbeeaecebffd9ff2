"""Where an ensemble looked: the mean of its members' maps for the ensemble's decision.

Each member explains the class the *ensemble* decided (not its own argmax), at its own target layer
and on its own input (its input size and normalisation), so a member with another architecture or
input size contributes on its own terms. Its map, in [0, 1], is resized to the cache image the
ensemble was given; the maps are averaged with the ensemble's weights and scaled to [0, 1] again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch

    from dermcam.models.ensemble import EnsembleModel


def member_layers(model: EnsembleModel, layer: str | None) -> list[str]:
    """Each member's default target layer; a named ``--layer`` belongs to one architecture, so it is refused."""
    from dermcam.models.layers import find_target_layer

    if layer is not None:
        raise BadInputError("--layer names a layer of one model; an ensemble's members each use their own "
                            "default target layer (drop --layer, or explain a member checkpoint)")
    return [find_target_layer(member.model) for member in model.members]


def ensemble_cam(model: EnsembleModel, x: torch.Tensor, method: str, targets: list[int], layers: list[str],
                 tta: bool = False) -> np.ndarray:
    """(B, H, W) maps in [0, 1] at ``x``'s size (the cache image) for ``targets``, one per image."""
    import torch
    import torch.nn.functional as F

    from dermcam.explain.methods import compute_cam

    total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32)
    with torch.no_grad():
        inputs = [i.detach() for i in model.member_inputs(x)]
    for member, weight, member_x, layer in zip(model.members, model.weights.cpu(), inputs, layers):
        maps = compute_cam(member.model, member_x, method, target_layer=layer, target=list(targets), tta=tta).maps
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[:, None], size=tuple(x.shape[-2:]),
                                mode="bilinear", align_corners=False)
        total += float(weight) * resized
    maps = total[:, 0].numpy()
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def maps_for(model: torch.nn.Module, x: torch.Tensor, method: str, targets: list[int]) -> np.ndarray:
    """(B, H, W) maps of ``targets`` at each model's default layer: an ensemble's mean map, or one
    model's own (what the report's gallery shows, as ``dermcam explain`` would)."""
    from dermcam.explain.methods import compute_cam
    from dermcam.models.ensemble import EnsembleModel

    if isinstance(model, EnsembleModel):
        return ensemble_cam(model, x, method, targets, member_layers(model, None))
    return compute_cam(model, x, method, target=targets).maps
