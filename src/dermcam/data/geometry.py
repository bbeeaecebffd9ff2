"""Image geometry: the one place that decides how a decoded image becomes the model's input tensor.

Every command that scores an image goes through these functions, so the same file gets the same
pixels whether training validates it, ``evaluate`` scores it or ``explain`` explains it:

1. :func:`cover_box` / :func:`cover_resize`: the photo is scaled to *cover* the cache size
   (256x192 by default, HAM10000's 4:3) and the overflow is cropped at the centre. This is what
   ``prepare`` stores in the image cache, and ``explain`` decodes a photo the same way
   (:func:`dermcam.data.images.decode_image` with the checkpoint's :func:`cache_size`).
2. :func:`batch_input` (``to_float`` -> ``color_constancy`` -> ``resize`` -> ``normalize``): the
   cache-sized pixels, whole, their illuminant divided out when the checkpoint records colour
   constancy (:mod:`dermcam.color`, at the cache resolution, before any resize or augmentation),
   resized to the model's input size and normalised; :func:`model_input` does it for one image.

Why crop rather than squash or pad: dermoscopy photos are framed on the lesion, a square or 3:2
photo loses only margin at its edges when it is cropped to 4:3, while squashing would change the
lesion's shape (border irregularity and asymmetry are diagnostic) and padding would feed the model
black bars it never saw in training. ``explain`` outlines the cropped view on its overlays.

:func:`parse_size` is the one parser of the ``WIDTHxHEIGHT`` options (``--cache-size``,
``--image-size``); it always returns ``(width, height)``. Torch is imported inside the functions
that need it, so option parsing stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.color import apply_color_constancy, color_constancy_of
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


def cover_box(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred region ``(left, top, right, bottom)`` of an image of ``image_size`` (W, H) with the
    aspect ratio of ``size`` (W, H): what the model sees of the photo."""
    width, height = image_size
    scale = max(size[0] / width, size[1] / height)
    box_w, box_h = size[0] / scale, size[1] / scale
    # Clamped into the image: the division can land a rounding error outside it (a 103x78 photo at
    # 256x192 gives left = -7e-15), and Pillow refuses a box that leaves the image.
    left, top = max(0.0, (width - box_w) / 2), max(0.0, (height - box_h) / 2)
    return left, top, min(float(width), left + box_w), min(float(height), top + box_h)


def cover_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover ``size`` (W, H) keeping the aspect ratio, cropping the overflow at the centre."""
    from PIL import Image

    return image.resize(size, Image.Resampling.BICUBIC, box=cover_box(image.size, size))


def cache_size(preprocessing: Mapping[str, Any]) -> tuple[int, int]:
    """The cache size (W, H) a checkpoint's images were decoded to; checkpoints written before it was
    recorded were all trained on the default cache."""
    size = preprocessing.get("cache_size") or DEFAULT_CACHE_SIZE
    return int(size[0]), int(size[1])


def to_float(batch: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [0,1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def color_constancy(x: torch.Tensor, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] from :func:`to_float` -> the same with the colour constancy that
    ``preprocessing`` records applied (none for sidecars without the key). Applied at the cache
    resolution, before resizing and augmentation, on every path that makes a model input."""
    return apply_color_constancy(x, color_constancy_of(preprocessing))


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


def batch_input(pixels: np.ndarray, preprocessing: Mapping[str, Any], device: Any = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 cache-sized pixels -> the model's normalised (B, 3, h, w) float input.

    Colour constancy (when the sidecar records it) comes first, at the cache size. The whole cache
    image is resized to the model's input size (no second crop). With an accelerator ``device`` the
    uint8 pixels travel (pinned, non-blocking: a quarter of the float bytes) and are converted,
    colour-corrected, resized and normalised there; on the CPU the arithmetic is unchanged.
    """
    import torch

    _, height, width = preprocessing["input_size"]
    if device is None or torch.device(device).type == "cpu":
        x = to_float(pixels)
    else:
        raw = torch.from_numpy(np.ascontiguousarray(pixels))
        if torch.device(device).type == "cuda":
            raw = raw.pin_memory()
        x = raw.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    x = color_constancy(x, preprocessing)
    x = resize(x, (int(height), int(width)))
    return normalize(x, preprocessing["mean"], preprocessing["std"])


def model_input(pixels: np.ndarray, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """One image's (H, W, 3) uint8 cache-sized pixels (from ``decode_image(path, cache_size(...))``)
    -> its (3, h, w) model input, exactly as training's validation and ``evaluate`` see it."""
    return batch_input(np.array(pixels, dtype=np.uint8)[None], preprocessing)[0]  # a writable copy for torch
