"""What changes the answer: an image with a painted artefact or a changed acquisition, one function each.

The audit scores every test image again after each perturbation and measures how the probabilities
and decisions move. Two kinds, :data:`PERTURBATIONS` in this order:

- **artefacts** that dermoscopy classifiers are known to take as evidence (Winkler et al., JAMA
  Dermatology 2019; Bissoto et al., 2019), painted on the photo: a violet surgical ink mark beside the
  lesion (never on it), a ruler along one edge, the dark circular field of a dermoscope, a few hairs.
  A model that is moved by these reads the photograph, not the lesion.
- **acquisition changes** a lesion does not care about: rotations by 90/180/270 degrees and flips (a
  lesion has no orientation), brightness and contrast +/-20%, JPEG at quality 30, a slight blur, half
  the resolution and back. A model moved by these is fragile rather than misled.

Every function takes and returns a uint8 (H, W, 3) image of the same shape, never changes its input,
and draws whatever is random from the generator it is given; :func:`perturb` seeds that generator from
``(seed, index, the perturbation's name)``, so the same image gets the same bytes on every run and
machine, and each image of a set gets its own mark. A rotation by 90 or 270 degrees of a non-square
image is rotated, then scaled to cover the original (W, H) and cropped at the centre
(:func:`dermcam.data.geometry.cover_resize`): it loses the ends of its long side, as a cache row of a
rotated photo would. Each call takes about a millisecond at 256x192 (numpy and Pillow, no torch).
docs/audit.md shows every one on an example.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dermcam.audit.detectors import check_pixels
from dermcam.checks import MAX_COUNT, SEED_MAX, check_int
from dermcam.data.geometry import cover_resize
from dermcam.errors import BadInputError

Apply = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None"], np.ndarray]

INK_COLOUR = (90, 40, 160)  # gentian violet, the surgical skin marker
INK_WIDTH = 0.016  # stroke width, a share of the short side (3 px at 192), at least 1.5 px
RULER_WIDTH = 0.09  # stripe width, a share of the short side (17 px at 192), at least 3 px
RULER_PERIOD = 0.035  # tick spacing (7 px at 192), at least 3 px; every fifth tick is long
HAIR_WIDTH = 0.008  # strand width (1.5 px at 192), at least 1 px
FACTOR = 0.2  # brightness and contrast: +/-20%
JPEG_QUALITY = 30
BLUR_SIGMA = 1.0  # the blur's standard deviation in pixels of the cache size (a binomial kernel: exactly 1)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: its name, ``kind`` ("artefact" or "acquisition"), a one-line description for
    tables and docs, and ``apply(pixels, rng, lesion_mask_or_None) -> new pixels``."""

    name: str
    kind: str
    description: str
    apply: Apply


def _blend(pixels: np.ndarray, alpha: np.ndarray, colour: np.ndarray, top: int = 0, left: int = 0) -> np.ndarray:
    """A copy of ``pixels`` with ``colour`` (RGB, or an (h, w, 3) array) laid over the window at
    (top, left) of ``alpha``'s shape, with opacity ``alpha`` in [0, 1]. Only the pixels it covers are
    computed (a vignette's corners, a few hairs), and the others stay exactly as they were."""
    out = pixels.copy()
    height, width = alpha.shape
    window = out[top:top + height, left:left + width]
    hit = alpha > 0
    if not hit.any():
        return out
    base = window[hit].astype(np.float32)  # (n, 3)
    paint = np.asarray(colour, dtype=np.float32)
    paint = paint[hit] if paint.ndim == 3 else paint
    mixed = base + alpha[hit][:, None] * (np.clip(paint, 0, 255) - base)  # between base and paint: in [0, 255]
    window[hit] = (mixed + 0.5).astype(np.uint8)
    return out


def _lesion_box(lesion: np.ndarray | None, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of the lesion mask's bounding box; without a mask (or an empty one),
    the middle 40% of the frame, where photos are centred on the lesion."""
    if lesion is not None and lesion.any():
        rows = np.flatnonzero(lesion.any(axis=1))
        cols = np.flatnonzero(lesion.any(axis=0))
        return float(rows[0]), float(rows[-1] + 1), float(cols[0]), float(cols[-1] + 1)
    height, width = shape
    return 0.3 * height, 0.7 * height, 0.3 * width, 0.7 * width


def _segment_alpha(shape: tuple[int, int], start: np.ndarray, end: np.ndarray,
                   width: float) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of a straight stroke (round caps) from ``start`` to ``end`` (row, col),
    ``width`` pixels wide: the coverage over the stroke's window and the window's (top, left)."""
    reach = width / 2 + 1
    top = int(max(0, np.floor(min(start[0], end[0]) - reach)))
    bottom = int(min(shape[0], np.ceil(max(start[0], end[0]) + reach) + 1))
    left = int(max(0, np.floor(min(start[1], end[1]) - reach)))
    right = int(min(shape[1], np.ceil(max(start[1], end[1]) + reach) + 1))
    if bottom <= top or right <= left:
        return np.zeros((0, 0), dtype=np.float32), 0, 0
    rows = np.arange(top, bottom, dtype=np.float32)[:, None] - start[0]
    cols = np.arange(left, right, dtype=np.float32)[None, :] - start[1]
    direction = (end - start).astype(np.float32)
    length2 = float(direction @ direction) or 1.0
    t = np.clip((rows * direction[0] + cols * direction[1]) / length2, 0.0, 1.0)
    distance = np.hypot(rows - t * direction[0], cols - t * direction[1])
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0).astype(np.float32), top, left


def paint_ink(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """A violet marker stroke beside the lesion: parallel to a side of its bounding box with room,
    a gap away from it, a fifth to a third of the short side long, soft-edged, never on the lesion
    mask (its pixels are left exactly as they were)."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    stroke = max(1.5, INK_WIDTH * side)
    top, bottom, left, right = _lesion_box(lesion, (height, width))
    gap = 0.04 * side + stroke
    room = {"left": left - gap, "right": width - right - gap, "top": top - gap, "bottom": height - bottom - gap}
    fits = [name for name, free in room.items() if free >= stroke]
    where = str(rng.choice(fits)) if fits else max(room, key=lambda name: room[name])
    half = rng.uniform(0.1, 0.17) * side
    tilt = np.deg2rad(rng.uniform(-20.0, 20.0))
    if where in ("left", "right"):
        col = left - gap if where == "left" else right + gap
        centre = np.array([rng.uniform(top, bottom), col])
        step = np.array([np.cos(tilt), np.sin(tilt)]) * half
    else:
        row = top - gap if where == "top" else bottom + gap
        centre = np.array([row, rng.uniform(left, right)])
        step = np.array([np.sin(tilt), np.cos(tilt)]) * half
    centre = np.clip(centre, stroke, np.array([height, width]) - 1 - stroke)
    alpha, top_px, left_px = _segment_alpha((height, width), centre - step, centre + step, stroke)
    if alpha.size == 0:
        return pixels.copy()
    alpha *= rng.uniform(0.85, 0.95)
    if lesion is not None:
        alpha[lesion[top_px:top_px + alpha.shape[0], left_px:left_px + alpha.shape[1]]] = 0.0
    colour = np.clip(np.array(INK_COLOUR) + rng.integers(-12, 13, size=3), 0, 255)
    return _blend(pixels, alpha, colour, top_px, left_px)


def paint_ruler(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """A light stripe along one edge (chosen at random) with dark tick marks across it, every fifth long."""
    del lesion
    height, width = pixels.shape[:2]
    side = min(height, width)
    depth = max(3, round(RULER_WIDTH * side))
    period = max(3, round(RULER_PERIOD * side))
    tick = max(1, round(side / 192))
    edge = int(rng.integers(4))  # top, bottom, left, right
    along = width if edge < 2 else height
    depth = min(depth, height if edge < 2 else width)  # a frame thinner than the stripe (tiny test images)
    u = np.arange(along)[None, :] + int(rng.integers(period))  # position along the edge
    v = np.arange(depth)[:, None]  # depth from the image's edge
    long_tick = (u // period) % 5 == 0
    ticks = (u % period < tick) & (v < np.where(long_tick, 0.7, 0.4) * depth)
    light = np.clip(np.array([236, 232, 218]) + rng.integers(-10, 11, size=3), 0, 255)
    colour = np.where(ticks[..., None], np.array([35, 35, 35]), light).astype(np.float32)  # (depth, along, 3)
    alpha = np.full((depth, along), rng.uniform(0.88, 0.96), dtype=np.float32)
    alpha[ticks] = 1.0
    if edge == 1:  # bottom: depth counted upwards
        colour, alpha = colour[::-1], alpha[::-1]
    elif edge >= 2:  # left or right: the stripe stands upright
        colour, alpha = colour.transpose(1, 0, 2), alpha.T
        if edge == 3:
            colour, alpha = colour[:, ::-1], alpha[:, ::-1]
    top = height - depth if edge == 1 else 0
    left = width - depth if edge == 3 else 0
    return _blend(pixels, np.ascontiguousarray(alpha), colour, top, left)


def paint_vignette(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """The dark outside of a dermoscope's circular field: near black beyond a centred circle whose
    radius lies between the inscribed circle's and halfway to the half-diagonal, with a soft edge."""
    del lesion
    height, width = pixels.shape[:2]
    inner, outer = min(height, width) / 2, float(np.hypot(height, width)) / 2
    radius = inner + rng.uniform(0.0, 0.5) * (outer - inner)
    soft = max(1.0, 0.03 * min(height, width))
    rows = np.arange(height, dtype=np.float32)[:, None] - (height - 1) / 2
    cols = np.arange(width, dtype=np.float32)[None, :] - (width - 1) / 2
    alpha = np.clip((np.sqrt(rows * rows + cols * cols) - radius) / soft + 0.5, 0.0, 1.0)
    return _blend(pixels, alpha, np.full(3, rng.integers(0, 16)))


def paint_hair(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """Four to eight thin dark curved strands (quadratic Bezier curves drawn at twice the size and
    reduced, so their edges are soft), anywhere, the lesion included, as real hair lies."""
    del lesion
    height, width = pixels.shape[:2]
    canvas = Image.new("L", (2 * width, 2 * height), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = max(2, round(2 * max(1.0, HAIR_WIDTH * min(height, width))))
    diagonal = float(np.hypot(height, width))
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for _ in range(int(rng.integers(4, 9))):
        start = rng.uniform([-0.1 * width, -0.1 * height], [1.1 * width, 1.1 * height])
        angle = rng.uniform(0.0, 2 * np.pi)
        length = rng.uniform(0.4, 0.9) * diagonal
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        bend = (start + end) / 2 + rng.uniform(-0.25, 0.25) * length * np.array([-np.sin(angle), np.cos(angle)])
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end  # (x, y) points
        draw.line([tuple(p) for p in (2 * curve).tolist()], fill=255, width=stroke, joint="curve")
    alpha = np.asarray(canvas.reduce(2), dtype=np.float32) * (rng.uniform(0.8, 0.95) / 255.0)
    colour = rng.integers(15, 60) * np.array([1.0, 0.8, 0.6])
    return _blend(pixels, alpha, colour)


def _rotate(k: int) -> Apply:
    def apply(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
        turned = np.rot90(pixels, k)
        if turned.shape == pixels.shape:
            return np.ascontiguousarray(turned)
        height, width = pixels.shape[:2]  # a quarter turn of a non-square image: cover and crop back
        return np.array(cover_resize(Image.fromarray(np.ascontiguousarray(turned)), (width, height)))
    return apply


def _flip(axis: int) -> Apply:
    def apply(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
        return np.ascontiguousarray(np.flip(pixels, axis=axis))
    return apply


def _brightness(factor: float) -> Apply:
    table = np.clip(np.round(np.arange(256) * factor), 0, 255).astype(np.uint8)

    def apply(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
        return table[pixels]
    return apply


def _contrast(factor: float) -> Apply:
    def apply(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
        mean = float(pixels.mean())  # around the image's mean value, so the mean stays where it was
        table = np.clip(np.round(mean + (np.arange(256) - mean) * factor), 0, 255).astype(np.uint8)
        return table[pixels]
    return apply


def jpeg(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """Saved as a JPEG at :data:`JPEG_QUALITY` (Pillow's default 4:2:0 chroma) and decoded, in memory."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.array(image.convert("RGB"))


def blur(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    """A Gaussian blur of sigma 1 px: the binomial kernel (1 4 6 4 1) / 16 (variance exactly 1) down
    the rows and across the columns, edges repeated, in integer arithmetic (exact, three times faster
    than Pillow's GaussianBlur)."""
    rows = np.pad(pixels.astype(np.uint16), ((2, 2), (0, 0), (0, 0)), mode="edge")
    rows = rows[:-4] + 4 * rows[1:-3] + 6 * rows[2:-2] + 4 * rows[3:-1] + rows[4:]  # at most 16 x 255
    cols = np.pad(rows, ((0, 0), (2, 2), (0, 0)), mode="edge")
    cols = cols[:, :-4] + 4 * cols[:, 1:-3] + 6 * cols[:, 2:-2] + 4 * cols[:, 3:-1] + cols[:, 4:]  # at most 65280
    return ((cols + 128) >> 8).astype(np.uint8)


def half_resolution(pixels: np.ndarray, rng: np.random.Generator, lesion: np.ndarray | None) -> np.ndarray:
    height, width = pixels.shape[:2]
    small = Image.fromarray(pixels).resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
    return np.array(small.resize((width, height), Image.Resampling.BILINEAR))


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in (
    Perturbation("ink", "artefact", "violet surgical-marker stroke beside the lesion", paint_ink),
    Perturbation("ruler", "artefact", "light ruler stripe with dark ticks along one edge", paint_ruler),
    Perturbation("vignette", "artefact", "dark circular dermoscope field outside a centred circle", paint_vignette),
    Perturbation("hair", "artefact", "four to eight thin dark curved hairs", paint_hair),
    Perturbation("rot90", "acquisition", "rotated 90 degrees counter-clockwise (cover-cropped back)", _rotate(1)),
    Perturbation("rot180", "acquisition", "rotated 180 degrees", _rotate(2)),
    Perturbation("rot270", "acquisition", "rotated 270 degrees counter-clockwise (cover-cropped back)", _rotate(3)),
    Perturbation("hflip", "acquisition", "mirrored left to right", _flip(1)),
    Perturbation("vflip", "acquisition", "mirrored top to bottom", _flip(0)),
    Perturbation("brighter", "acquisition", "brightness +20%", _brightness(1 + FACTOR)),
    Perturbation("darker", "acquisition", "brightness -20%", _brightness(1 - FACTOR)),
    Perturbation("more_contrast", "acquisition", "contrast +20% around the mean value", _contrast(1 + FACTOR)),
    Perturbation("less_contrast", "acquisition", "contrast -20% around the mean value", _contrast(1 - FACTOR)),
    Perturbation("jpeg30", "acquisition", f"JPEG at quality {JPEG_QUALITY}", jpeg),
    Perturbation("blur", "acquisition", f"Gaussian blur, sigma {BLUR_SIGMA:g} px", blur),
    Perturbation("half_res", "acquisition", "half the resolution and back (bilinear)", half_resolution),
)}


def stable_id(name: str) -> int:
    """A number for ``name`` that is the same in every process (Python's ``hash`` of a str is not)."""
    return zlib.crc32(name.encode("utf-8"))


def perturb(pixels: np.ndarray, name: str, *, seed: int, index: int, lesion: np.ndarray | None = None) -> np.ndarray:
    """``pixels`` (uint8 (H, W, 3)) with perturbation ``name`` applied: a new array of the same shape.

    The generator is ``np.random.default_rng([seed, index, stable_id(name)])``: the same image, seed and
    index give the same bytes anywhere; another index (the image's row) gives another mark. ``lesion``
    is the image's lesion mask (bool (H, W)), which keeps the ink mark beside the lesion; without it
    the mark goes beside the middle of the frame.
    """
    if name not in PERTURBATIONS:
        raise BadInputError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}")
    check_pixels(pixels)
    seed = check_int(seed, "--seed", 0, SEED_MAX)
    index = check_int(index, "index", 0, MAX_COUNT)
    if lesion is not None:
        lesion = np.asarray(lesion)
        if lesion.shape != pixels.shape[:2]:
            raise BadInputError(f"lesion mask has shape {lesion.shape}, the image {pixels.shape[:2]}")
        lesion = lesion.astype(bool, copy=False)
    rng = np.random.default_rng([seed, index, stable_id(name)])
    return PERTURBATIONS[name].apply(pixels, rng, lesion)
