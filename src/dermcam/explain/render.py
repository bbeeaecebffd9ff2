"""Heatmap overlays a clinician can read at a glance: the image, where the model looked, and what it said.

The overlay keeps the photo's own resolution (no thumbnails of a 6000 px dermoscope image), blends a
colour-mapped CAM over it and writes a legend strip at the bottom: the class with its probability on
the left, a colour bar from "low" to "high" attention on the right. Pure Pillow + numpy: colour maps
are small lookup tables, so neither matplotlib nor OpenCV is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermcam.errors import BadInputError
from dermcam.store.files import atomic_path

if TYPE_CHECKING:
    from PIL import Image


def _jet() -> np.ndarray:
    """The classic 'jet' (MATLAB/OpenCV) colour map: blue -> cyan -> yellow -> red, 256 x 3 uint8."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4 * x - centre), 0, 1) for centre in (3, 2, 1)]  # r, g, b
    return np.round(np.stack(channels, axis=1) * 255).astype(np.uint8)


# Lookup tables by name. Only jet for now: perceptual maps such as viridis start dark purple, which
# on pink-red skin reads as "lesion", not as "no attention".
COLORMAPS: dict[str, np.ndarray] = {"jet": _jet()}


def colorize(cam_map: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 RGB through a :data:`COLORMAPS` table."""
    try:
        table = COLORMAPS[colormap]
    except KeyError:
        raise BadInputError(f"unknown colour map {colormap!r}; choose one of {', '.join(COLORMAPS)}") from None
    index = np.round(np.clip(np.nan_to_num(cam_map, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    return table[index]


OUTSIDE_DIM = 0.5  # how much the photo outside the model's view is darkened


def _resize_map(cam_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height), values kept in [0, 1]."""
    from PIL import Image

    resized = Image.fromarray(np.asarray(cam_map, dtype=np.float32), mode="F").resize(size, Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _draw_legend(canvas: Image.Image, label: str, probability: float, colormap: str, note: str | None = None) -> None:
    """Bottom strip, drawn in place: ``label  87.3%`` (then ``note``, an operating point's decision)
    left, ``low [colour bar] high`` right.

    Everything scales with the image's shorter side so a 200 px and a 4000 px image look alike.
    """
    from PIL import Image, ImageDraw

    width, height = canvas.size
    strip = max(16, round(min(width, height) * 0.1))
    pad = max(2, strip // 6)
    font = _font(max(9, round(strip * 0.6)))
    small = _font(max(8, round(strip * 0.45)))

    shade = Image.new("RGBA", (width, strip), (0, 0, 0, 170))
    canvas.paste(Image.alpha_composite(canvas.crop((0, height - strip, width, height)).convert("RGBA"),
                                       shade).convert("RGB"), (0, height - strip))
    draw = ImageDraw.Draw(canvas)
    middle = height - strip / 2
    bar_width = max(24, round(width * 0.22))
    low_width = draw.textlength("low", font=small)
    high_width = draw.textlength("high", font=small)
    bar_right = round(width - pad * 3 - high_width)
    bar_left = bar_right - bar_width

    text = f"{label}  {probability:.1%}" + (f"  ({note})" if note else "")
    size = round(strip * 0.6)
    while size > 9 and draw.textlength(text, font=font) > bar_left - low_width - pad * 4:
        size -= 1  # a long note shrinks to fit left of the colour bar instead of running under it
        font = _font(size)
    draw.text((pad * 2, middle), text, font=font, fill=(255, 255, 255), anchor="lm")
    bar_top, bar_bottom = round(middle - strip * 0.2), round(middle + strip * 0.2)
    gradient = colorize(np.linspace(0.0, 1.0, bar_width)[None, :], colormap)
    bar = Image.fromarray(np.repeat(gradient, bar_bottom - bar_top, axis=0), mode="RGB")
    canvas.paste(bar, (bar_left, bar_top))
    draw.rectangle((bar_left - 1, bar_top - 1, bar_left + bar_width, bar_bottom), outline=(255, 255, 255))
    draw.text((bar_left - pad - low_width, middle), "low", font=small, fill=(230, 230, 230), anchor="lm")
    draw.text((bar_right + pad, middle), "high", font=small, fill=(230, 230, 230), anchor="lm")


def render_overlay(image: Image.Image, cam_map: np.ndarray, *, label: str, probability: float,
                   colormap: str = "jet", alpha: float = 0.45, note: str | None = None,
                   view: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The photo at its own resolution with the CAM blended over it and a legend strip.

    ``cam_map`` (h, w) in [0, 1] at any resolution (the model's input size, typically) is upsampled
    bilinearly to the photo's size. Each pixel is ``(1 - alpha) * photo + alpha * colour(cam)``, the
    convention of the Grad-CAM paper and pytorch-grad-cam, so overlays look like the ones clinicians
    have seen in the literature. ``label``/``probability`` name the class the map explains; ``note``
    follows them (``mel: above threshold 0.231``, the operating point's decision).

    ``view`` is the region of the photo the model saw (:func:`dermcam.data.geometry.cover_box`):
    the map covers that region only, the cropped-off margins are dimmed and the region is outlined,
    so nobody reads "no evidence" into a part of the photo the model never looked at.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"alpha must be between 0 and 1, got {alpha}")
    cam = np.asarray(cam_map)
    if cam.ndim != 2:
        raise BadInputError(f"cam_map must be a 2-D (h, w) array, got shape {cam.shape}")
    photo = image.convert("RGB")
    left, top, right, bottom = _pixel_box(view, photo.size)
    pixels = np.asarray(photo, dtype=np.float32)
    blended = pixels * (1.0 - OUTSIDE_DIM)  # margins the model did not see
    heat = colorize(_resize_map(cam, (right - left, bottom - top)), colormap).astype(np.float32)
    blended[top:bottom, left:right] = (1.0 - alpha) * pixels[top:bottom, left:right] + alpha * heat
    canvas = Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")
    if (left, top, right, bottom) != (0, 0, *photo.size):
        from PIL import ImageDraw

        ImageDraw.Draw(canvas).rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 255),
                                         width=max(1, round(min(photo.size) / 200)))
    _draw_legend(canvas, label, probability, colormap, note)
    return canvas


def _pixel_box(view: tuple[float, float, float, float] | None, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``view`` rounded to whole pixels inside an image of ``size``; the whole image when None."""
    if view is None:
        return 0, 0, size[0], size[1]
    left, top = max(0, round(view[0])), max(0, round(view[1]))
    right, bottom = min(size[0], round(view[2])), min(size[1], round(view[3]))
    if right - left < 1 or bottom - top < 1:
        raise BadInputError(f"view {view} lies outside the {size[0]}x{size[1]} image")
    return left, top, right, bottom


def save_png(img: Image.Image, path: Path) -> Path:
    """Write ``img`` as PNG atomically (never a half-written file under ``path``); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
