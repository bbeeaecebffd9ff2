"""The CAM methods, each a few lines over :class:`~dermcam.explain.cam.CAM`.

=============  ====================================================================================
``gradcam``    Selvaraju et al. 2017: channel weight = spatial mean of d(logit_c)/d(activation).
``gradcam++``  Chattopadhay et al. 2018: gradient weights re-weighted per position (their eq. 19).
``scorecam``   Wang et al. 2020: gradient-free; channel weight = softmax over channels of the
               logit obtained when the input is masked by that (upsampled, min-max scaled) channel.
``eigencam``   Muhammad & Yeasin 2020: gradient-free and class-agnostic; projection of the
               activations on their first principal component.
=============  ====================================================================================

A new method is a subclass of :class:`~dermcam.explain.cam.CAM` plus one entry in :data:`METHODS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dermcam.errors import BadInputError
from dermcam.explain.cam import CAM, CAMResult, ReshapeTransform, Target
from dermcam.explain.tta import tta_cam

if TYPE_CHECKING:
    import torch


class GradCAM(CAM):
    """Selvaraju et al. 2017 (https://arxiv.org/abs/1610.02391)."""

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        assert gradients is not None
        return gradients.mean(dim=(2, 3))


class GradCAMPlusPlus(CAM):
    """Chattopadhay et al. 2018 (https://arxiv.org/abs/1710.11063), closed form of their eq. 19.

    Positions where the gradient is positive get weight alpha = g^2 / (2 g^2 + sum(A) g^3), which
    lets several separate instances of a class all show up instead of the strongest one only.
    """

    name = "gradcam++"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        import torch

        assert gradients is not None
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp_min(0) * alpha).sum(dim=(2, 3))


class ScoreCAM(CAM):
    """Wang et al. 2020 (https://arxiv.org/abs/1910.01279): no gradients, one forward per channel.

    Each channel, upsampled to the input and min-max scaled, masks the input; the target logit of
    the masked image is that channel's score; weights are the softmax of the scores over channels.
    Masked images go through the model in batches of ``batch_size`` (memory vs speed).
    """

    name = "scorecam"
    uses_gradients = False

    def __init__(self, model: torch.nn.Module, target_layer: str,
                 reshape_transform: ReshapeTransform | None = None, batch_size: int = 32) -> None:
        super().__init__(model, target_layer, reshape_transform)
        self.batch_size = batch_size

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        scores = []
        with torch.no_grad():
            # align_corners=True for the masks, as in the paper's reference code and pytorch-grad-cam
            masks = F.interpolate(activations, size=x.shape[-2:], mode="bilinear", align_corners=True)
            low = masks.flatten(2).min(dim=2).values[..., None, None]
            high = masks.flatten(2).max(dim=2).values[..., None, None]
            masks = (masks - low) / (high - low + 1e-8)
            for image, mask, target in zip(x, masks, targets):
                logits = [self.model(image[None] * chunk[:, None])[:, target]
                          for chunk in mask.split(self.batch_size)]
                scores.append(torch.cat(logits))
        return torch.stack(scores).float().softmax(dim=1)


class EigenCAM(CAM):
    """Muhammad & Yeasin 2020 (https://arxiv.org/abs/2008.00299): first principal component.

    Class-agnostic (the target only labels the result). The sign of a principal component is
    arbitrary, so it is chosen to make the larger excursion positive (Chung & Ying 2025, eq. 13);
    without this the map of the same image can come out inverted from one run to the next.
    """

    name = "eigencam"
    uses_gradients = False

    def saliency(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                 targets: list[int]) -> torch.Tensor:
        import torch

        batch, channels, height, width = activations.shape
        rows = activations.nan_to_num(0.0).flatten(2).transpose(1, 2).double()  # (B, hw, C)
        rows = rows - rows.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(rows, full_matrices=False)
        projection = (rows @ vh[:, 0, :, None])[..., 0]  # (B, hw)
        flip = projection.min(dim=1).values.abs() > projection.max(dim=1).values.abs()
        projection = torch.where(flip[:, None], -projection, projection)
        return projection.reshape(batch, height, width).float()


METHODS: dict[str, type[CAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
}


def make_cam(model: torch.nn.Module, method: str, target_layer: str,
             reshape_transform: ReshapeTransform | None = None) -> CAM:
    """The CAM object for a method name (one of :data:`METHODS`), with a clear error otherwise."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise BadInputError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}") from None
    return cls(model, target_layer, reshape_transform)


def compute_cam(model: torch.nn.Module, x: torch.Tensor, method: str = "gradcam",
                target_layer: str | None = None, target: Target = None, tta: bool = False,
                reshape_transform: ReshapeTransform | None = None) -> CAMResult:
    """Maps for ``x`` (B, 3, H, W) with one of :data:`METHODS`.

    ``target_layer`` defaults to :func:`dermcam.models.find_target_layer`; ``reshape_transform`` to
    :func:`dermcam.models.reshape_transform_for` (token-to-map folding for ViT/Swin, None for CNNs),
    also when a layer is named, since a transformer's blocks all emit tokens.

    ``tta`` averages probabilities and maps over the four flips (none, horizontal, vertical, both;
    each map flipped back before averaging, then min-max scaled again): the explained class is the
    argmax of the averaged probabilities, so all four maps explain the same class. It costs four
    times the compute.
    """
    from dermcam.models.layers import find_target_layer, reshape_transform_for

    if target_layer is None:
        target_layer = find_target_layer(model)
    if reshape_transform is None:
        reshape_transform = reshape_transform_for(model)
    cam = make_cam(model, method, target_layer, reshape_transform)
    if not tta:
        return cam(x, target)
    return tta_cam(cam, x, target)
