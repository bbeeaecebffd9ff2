"""Colour constancy: each image's illuminant estimated and divided out, so that the same lesion under a
warmer or cooler dermatoscope light reaches the model in the same colours.

**Shades of Gray** (Finlayson & Trezzi, 2004; the ISIC 2018/2019 winners' colour step, Gessert et al.)
estimates the illuminant of channel ``c`` as the Minkowski p-norm mean of its pixels,
``e_c = mean(x_c ** p) ** (1 / p)`` with ``p = 6``: ``p = 1`` is grey world (the mean colour),
``p = inf`` is white patch (the brightest pixel); 6 sits between them, so bright pixels weigh most
without one specular highlight deciding. The image is then multiplied per channel by
``gain_c = mean(e) / e_c``, which makes the estimated illuminant grey while keeping its brightness,
and clamped back to [0, 1].

This module is the formula's one home. It sits at the top of the package, beside ``errors``, because
two layers that may not import each other both apply it: ``dermcam.data.geometry`` (every single-model
input: training, evaluate, explain, serve, ONNX) and ``dermcam.models.ensemble`` (each ensemble member
applies its own setting; ``models`` may not import ``data``). The store's schema reads
:data:`COLOR_CONSTANCY_METHODS` to check sidecars. Torch is imported inside the functions.

A checkpoint's sidecar records the method as ``preprocessing["color_constancy"]``; a sidecar without the
key (written before it existed) means ``"none"`` (:func:`color_constancy_of`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch

NONE = "none"
SHADES_OF_GRAY = "shades-of-gray"
COLOR_CONSTANCY_METHODS: tuple[str, ...] = (NONE, SHADES_OF_GRAY)  # --color-constancy's values, in help order
SHADES_OF_GRAY_P = 6  # the Minkowski norm: the usual choice (Finlayson & Trezzi; the ISIC winners)
# Smallest illuminant a channel may have before the division: an all-black image (or a channel with no
# light at all) would otherwise give 0/0. With it the gain stays finite (at most 1/EPS), and the pixels it
# multiplies are 0 anyway, so black stays black.
EPS = 1e-6


def color_constancy_of(preprocessing: Mapping[str, Any]) -> str:
    """The colour-constancy method a sidecar's ``preprocessing`` records; older sidecars have none."""
    return str(preprocessing.get("color_constancy") or NONE)


def shades_of_gray(x: torch.Tensor, p: int = SHADES_OF_GRAY_P) -> torch.Tensor:
    """A (B, 3, H, W) batch in [0, 1] with each image's Shades-of-Gray illuminant made grey; float32,
    in [0, 1]. Every step is a plain tensor operation (pow, mean, clamp), so the ONNX export traces it."""
    x = x.float()
    illuminant = x.pow(p).mean(dim=(2, 3), keepdim=True).pow(1.0 / p)  # (B, 3, 1, 1)
    gain = illuminant.mean(dim=1, keepdim=True) / illuminant.clamp_min(EPS)
    return (x * gain).clamp(0.0, 1.0)


def apply_color_constancy(x: torch.Tensor, method: str) -> torch.Tensor:
    """``x`` (B, 3, H, W) in [0, 1] seen through ``method`` (one of :data:`COLOR_CONSTANCY_METHODS`);
    ``"none"`` returns ``x`` itself, so checkpoints without colour constancy compute exactly what they did."""
    if method == NONE:
        return x
    if method == SHADES_OF_GRAY:
        return shades_of_gray(x)
    # Sidecars and options are checked long before this; a library caller gets the same one line.
    raise BadInputError(f"--color-constancy '{method}' must be one of {', '.join(COLOR_CONSTANCY_METHODS)}")
