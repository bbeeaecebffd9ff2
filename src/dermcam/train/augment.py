"""Batch image pipeline: uint8 cache rows -> normalised model input, with dermoscopy augmentations.

Augmentation runs on whole batches in the main process (one ``affine_grid``/``grid_sample`` per batch)
instead of per image in DataLoader workers: on a 2-core laptop that keeps the data pipeline far
cheaper than the model step, and it makes every random draw a function of (seed, epoch, batch), which
is what lets an interrupted run resume with exactly the same data.

Dermoscopy has no canonical orientation, so any rotation and both flips are valid; colour and scale
jitter stay mild because colour is diagnostic (blue-grey veil, regression structures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The random stream of one batch, derived from where it is in training (resume-exact)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one batch's augmentation, one row per image.

    Drawn for the whole global batch and then sliced, so a process that handles only part of the
    batch (distributed training) gives its images exactly the transforms a single process would.
    """

    theta: torch.Tensor  # (B, 2, 3) affine transforms for ``affine_grid``
    color: torch.Tensor | None  # (B, 3) brightness, contrast and saturation factors, or None

    def __len__(self) -> int:
        return len(self.theta)

    def __getitem__(self, index: slice) -> AugmentDraw:
        return AugmentDraw(self.theta[index], None if self.color is None else self.color[index])


def draw_augment(n: int, aspect: float, generator: torch.Generator, *, scale: tuple[float, float] = (0.75, 1.0),
                 color: float = 0.1) -> AugmentDraw:
    """Random rotation (any angle), both flips, zoom and small shift, and mild colour jitter for ``n`` images.

    One affine transform per image, built in the source's physical (aspect-correct, ``aspect`` = w/h)
    coordinates, so a rotated 4:3 lesion is not sheared.
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(0.0, 2 * math.pi)
    zoom = uniform(*scale)
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - zoom).unsqueeze(1) * 0.5
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    # theta = D^-1 R S F D with D = diag(aspect, 1): rotate in physical units, sample in normalised ones.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * flip_y / aspect
    theta[:, 1, 0] = sin * flip_x * aspect
    theta[:, 1, 1] = cos * flip_y
    theta[:, :, 2] = shift
    factors = None
    if color > 0:
        factors = torch.stack([1 + (torch.rand(n, generator=generator) * 2 - 1) * color for _ in range(3)], dim=1)
    return AugmentDraw(theta, factors)


def apply_augment(x: torch.Tensor, size: tuple[int, int], draw: AugmentDraw) -> torch.Tensor:
    """Warp and colour-jitter ``x`` (B,3,H,W) with ``draw`` (B rows); the output view is the source
    squashed to ``size`` exactly as :func:`resize` does at evaluation time."""
    b = x.shape[0]
    grid = F.affine_grid(draw.theta, [b, 3, size[0], size[1]], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if draw.color is not None:
        out = _color_jitter(out, draw.color)
    return out


def augment(x: torch.Tensor, size: tuple[int, int], generator: torch.Generator, *,
            scale: tuple[float, float] = (0.75, 1.0), color: float = 0.1) -> torch.Tensor:
    """Augment a whole batch: :func:`draw_augment` for its images, then :func:`apply_augment`."""
    _, _, h, w = x.shape
    return apply_augment(x, size, draw_augment(x.shape[0], w / h, generator, scale=scale, color=color))


def _color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    brightness, contrast, saturation = (factors[:, i].view(b, 1, 1, 1) for i in range(3))
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * saturation + gray
    return x.clamp_(0.0, 1.0)
