"""Image geometry: the one place that decides how a decoded image becomes the model's input tensor.

Every command that scores an image goes through these functions, so the same file gets the same
pixels whether training validates it, ``evaluate`` scores it or ``explain`` explains it:

1. :func:`cover_resize` crops and resizes a photo to the cache's aspect ratio (what ``prepare``
   stores in the image cache);
2. :func:`to_float`, :func:`resize` and :func:`normalize` turn those pixels into the model's input;
   :func:`model_input` is the three together for one image.

:func:`parse_size` is the one parser of the ``WIDTHxHEIGHT`` options (``--cache-size``,
``--image-size``); it always returns ``(width, height)``. Torch is imported inside the functions
that need it, so option parsing stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_CACHE_SIZE = (256, 192)  # width x height: HAM10000's 4:3, a little above any model input used
# Test-time augmentation views: none, horizontal, vertical, both (dims of an NCHW tensor). A closed
# set, so the TTA prediction of a flipped image equals the original's (a lesion has no orientation).
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def parse_size(value: int | str | Sequence[int], option: str = "--image-size", *, low: int = 8,
               high: int = 4096) -> tuple[int, int]:
    """``(width, height)`` from ``192`` (square), ``"192x144"`` (WIDTHxHEIGHT) or a ``(width, height)``
    pair, each side in [low, high]; else a one-line BadInputError naming ``option``."""
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value] if len(value) == 2 else []
    else:
        parts = [p.strip() for p in str(value).lower().strip().split("x")]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise BadInputError(f"{option} '{value}' must be a number (192) or WIDTHxHEIGHT (192x144)")
    width, height = int(parts[0]), int(parts[-1])
    if not (low <= width <= high and low <= height <= high):
        raise BadInputError(f"{option} '{value}' must be {low} to {high} pixels on each side")
    return width, height


def cover_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover ``size`` (W, H) keeping the aspect ratio, cropping the overflow at the centre."""
    from PIL import Image

    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    box_w, box_h = size[0] / scale, size[1] / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))


def to_float(batch: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [0,1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Deterministic evaluation view: the whole image resized to ``size`` = (H, W), no crop."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    import torch

    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def flips(x: torch.Tensor) -> list[torch.Tensor]:
    """The test-time-augmentation views of a batch, in :data:`FLIP_DIMS` order."""
    return [x.flip(dims) if dims else x for dims in FLIP_DIMS]


def model_input(image: Any, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """PIL image -> normalised (3,H,W) float tensor, exactly as evaluation sees images.

    The whole image is resized to the model's input size (no centre crop): lesions are not always
    centred, and training's validation path does the same.
    """
    _, height, width = preprocessing["input_size"]
    array = np.array(image.convert("RGB"), dtype=np.uint8)[None]  # a writable copy for torch
    x = resize(to_float(array), (height, width))
    return normalize(x, preprocessing["mean"], preprocessing["std"])[0]
