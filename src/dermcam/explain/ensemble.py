"""Where an ensemble looked: the mean of its members' maps for the ensemble's decision.

Each member explains the class the *ensemble* decided (not its own argmax), at its own target layer
and on its own input (its input size and normalisation), so a member with another architecture or
input size contributes on its own terms. Its map, in [0, 1], is resized to the cache image the
ensemble was given; the maps are averaged with the ensemble's weights and scaled to [0, 1] again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch

    from dermcam.explain.metadata import Rows
    from dermcam.models.ensemble import EnsembleModel


def member_layers(model: EnsembleModel, layer: str | None) -> list[str]:
    """Each member's default target layer; a named ``--layer`` belongs to one architecture, so it is refused."""
    from dermcam.models.layers import find_target_layer

    if layer is not None:
        raise BadInputError("--layer names a layer of one model; an ensemble's members each use their own "
                            "default target layer (drop --layer, or explain a member checkpoint)")
    return [find_target_layer(member.model) for member in model.members]


def ensemble_cam(model: EnsembleModel, x: torch.Tensor, method: str, targets: list[int], layers: list[str],
                 tta: bool = False, rows: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """(B, H, W) maps in [0, 1] at ``x``'s size (the cache image) for ``targets``, one per image.
    ``rows``: the images' encoded patient metadata, one array (or None) per member; a member that reads
    metadata explains its answer *with* its rows (:mod:`dermcam.explain.metadata`)."""
    import torch
    import torch.nn.functional as F

    from dermcam.explain.metadata import bind
    from dermcam.explain.methods import compute_cam
    from dermcam.models.layers import reshape_transform_for

    total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32)
    with torch.no_grad():
        inputs = [i.detach() for i in model.member_inputs(x)]
    member_rows = list(rows) if rows is not None else [None] * len(model.members)
    for member, weight, member_x, layer, part in zip(model.members, model.weights.cpu(), inputs, layers, member_rows):
        bound = bind(member.model, part if member.uses_metadata else None)
        maps = compute_cam(bound, member_x, method, target_layer=layer, target=list(targets), tta=tta,
                           reshape_transform=reshape_transform_for(member.model)).maps
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[:, None], size=tuple(x.shape[-2:]),
                                mode="bilinear", align_corners=False)
        total += float(weight) * resized
    maps = total[:, 0].numpy()
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def maps_for(model: torch.nn.Module, x: torch.Tensor, method: str, targets: list[int],
             rows: Any = None) -> np.ndarray:
    """(B, H, W) maps of ``targets`` at each model's default layer: an ensemble's mean map, or one
    model's own (what the report's gallery shows, as ``dermcam explain`` would). ``rows``: the images'
    encoded metadata (:func:`dermcam.data.metadata.model_metadata`), for a model that reads it."""
    from dermcam.explain.methods import compute_cam
    from dermcam.models.ensemble import EnsembleModel

    if rows is not None:
        layers = member_layers(model, None) if isinstance(model, EnsembleModel) else None  # type: ignore[arg-type]
        return grouped_maps(model, x, method, targets, rows, member_layers=layers)
    if isinstance(model, EnsembleModel):
        return ensemble_cam(model, x, method, targets, member_layers(model, None))
    return compute_cam(model, x, method, target=targets).maps


def grouped_maps(model: torch.nn.Module, x: torch.Tensor, method: str, targets: Sequence[int], rows: Rows, *,
                 layer: str | None = None, member_layers: list[str] | None = None, tta: bool = False,
                 reshape_transform: Any = None) -> np.ndarray:
    """(B, H, W) maps of ``targets``, each image's computed with its own metadata bound (runs of equal
    rows share a pass). ``member_layers``: ``model`` is an ensemble, explained as
    :func:`dermcam.explain.ensemble.ensemble_cam` does; else ``layer`` (default: the model's target
    layer) and ``reshape_transform`` (default: the model's), both found on the model itself, not on
    the wrapper that binds its rows."""
    from dermcam.explain.metadata import bind, groups, one_row, take
    from dermcam.explain.methods import compute_cam
    from dermcam.models.layers import find_target_layer, reshape_transform_for

    if member_layers is None:
        layer = layer or find_target_layer(model)
        reshape_transform = reshape_transform or reshape_transform_for(model)
    out: np.ndarray | None = None
    for run in groups(rows, len(targets)):
        part, chosen = one_row(take(rows, run)), [int(targets[i]) for i in run]
        if member_layers is not None:
            maps = ensemble_cam(model, x[run], method, chosen, member_layers, tta=tta, rows=part)  # type: ignore[arg-type]
        else:
            maps = compute_cam(bind(model, part), x[run], method, target_layer=layer, target=chosen, tta=tta,
                               reshape_transform=reshape_transform).maps
        if out is None:
            out = np.empty((len(targets), *maps.shape[1:]), dtype=np.float32)
        out[run] = maps
    assert out is not None
    return out
