"""A small, learnable, dermoscopy-like data set in the exact Kaggle HAM10000 layout.

Why it exists: tests, the quick-start and ``dermcam demo`` need real JPEGs that go through the very
same ``dermcam prepare`` path as HAM10000, without shipping (or downloading) patient images. Each
class has its own look, so a small CNN learns it in a few epochs:

- ``nv``    round, even medium brown, soft border;
- ``bkl``   lighter tan, waxy blotchy texture, slightly oval;
- ``mel``   irregular border, several colours (dark brown, black, blue-grey);
- ``akiec`` pinkish-red, scaly speckles;  ``bcc`` pearly pink with fine red vessels;
- ``df``    small brown ring with a pale centre;  ``vasc`` red-purple lagoons.

Every lesion is drawn once on its own canvas and then photographed several times (rotation, shift,
scale, lighting and hairs change), so images of one lesion are alike, as in HAM10000 - which is why
splits must be grouped by ``lesion_id``. numpy and Pillow only: a few hundred images take seconds.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dermcam.data.classes import CLASS_CODES
from dermcam.data.sources.ham10000 import METADATA_COLUMNS
from dermcam.errors import BadInputError
from dermcam.store.files import atomic_write_bytes

LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest")


@dataclass(frozen=True)
class _Style:
    """How a class looks: size range (fraction of the short side), border irregularity, colours."""

    radius: tuple[float, float]
    irregularity: float  # amplitude of the border's harmonics
    harmonics: int  # how many harmonics shape the border
    colours: tuple[tuple[int, int, int], ...]  # palette mixed by low-frequency noise
    speckle: float  # strength of fine texture
    opacity: float
    dx_types: tuple[str, ...]


STYLES: dict[str, _Style] = {
    "nv": _Style((0.22, 0.32), 0.04, 3, ((120, 78, 52), (132, 88, 60)), 0.03, 0.92,
                 ("follow_up", "histo", "consensus")),
    "bkl": _Style((0.25, 0.36), 0.10, 4, ((178, 138, 98), (150, 112, 80), (196, 160, 120)), 0.20, 0.75,
                  ("histo", "consensus", "confocal")),
    "mel": _Style((0.28, 0.40), 0.22, 7, ((70, 42, 30), (25, 18, 18), (118, 74, 48), (55, 35, 28)),
                  0.10, 0.95, ("histo",)),
    "akiec": _Style((0.20, 0.32), 0.12, 5, ((196, 110, 104), (214, 150, 140)), 0.30, 0.70, ("histo",)),
    "bcc": _Style((0.20, 0.30), 0.08, 4, ((222, 176, 170), (205, 150, 150)), 0.05, 0.70, ("histo",)),
    "df": _Style((0.14, 0.22), 0.05, 3, ((128, 84, 62), (150, 104, 80)), 0.05, 0.90,
                 ("histo", "consensus")),
    "vasc": _Style((0.15, 0.25), 0.08, 4, ((150, 40, 70), (100, 30, 80), (180, 60, 80)), 0.05, 0.95,
                   ("histo", "consensus")),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a tiny random grid upsampled bicubically."""
    h, w = shape
    grid = rng.random((cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(up)
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _lesion_canvas(rng: np.random.Generator, dx: str, side: int) -> Image.Image:
    """Draw one lesion (RGBA, transparent outside) on a square canvas of ``side`` pixels."""
    style = STYLES[dx]
    radius = rng.uniform(*style.radius) * side
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2
    aspect = rng.uniform(0.8, 1.0) if dx != "bkl" else rng.uniform(0.65, 0.85)
    dist = np.hypot(xx, yy / aspect)
    theta = np.arctan2(yy, xx)
    border = np.ones_like(theta)
    for k in range(2, 2 + style.harmonics):
        border += style.irregularity * rng.uniform(0.3, 1.0) / math.sqrt(k - 1) * np.cos(
            k * theta + rng.uniform(0, 2 * math.pi))
    inside = radius * border - dist
    alpha = np.clip(inside / (0.08 * radius) + 0.5, 0.0, 1.0) * style.opacity

    mix = _smooth_noise(rng, (side, side), 5 if dx == "mel" else 4)
    palette = np.array(style.colours, dtype=np.float32)
    pos = mix * (len(palette) - 1)  # every palette has at least two colours
    low = np.floor(pos).astype(int).clip(0, len(palette) - 2)
    frac = (pos - low)[..., None]
    rgb = palette[low] * (1 - frac) + palette[low + 1] * frac
    rgb *= 1 + style.speckle * (rng.random((side, side, 1)).astype(np.float32) - 0.5)

    rel = np.clip(dist / np.maximum(radius * border, 1.0), 0, 1)[..., None]
    if dx == "nv":  # slightly darker centre, a typical naevus pigment network
        rgb *= 0.9 + 0.1 * rel
    elif dx == "df":  # pale scar-like centre inside a brown ring
        rgb = rgb * (rel > 0.45) + np.array([218, 190, 170], np.float32) * (rel <= 0.45)
    elif dx == "bcc":  # fine branching red vessels
        vessels = np.abs(np.sin(theta * rng.integers(3, 6) + dist / 4.0)) < 0.08
        rgb[vessels & (rel[..., 0] < 0.9)] = (170, 40, 50)
    elif dx == "mel":  # a blue-grey veil patch and black dots
        veil = _smooth_noise(rng, (side, side), 3) > 0.7
        rgb[veil] = rgb[veil] * 0.4 + np.array([95, 105, 135], np.float32) * 0.6
        dots = rng.random((side, side)) < 0.01
        rgb[dots & (rel[..., 0] < 0.8)] = (20, 15, 15)
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


def _skin(rng: np.random.Generator, size: tuple[int, int], tone: np.ndarray) -> np.ndarray:
    """A skin-coloured background with blotches and pixel noise (float32 HxWx3)."""
    w, h = size
    blotch = _smooth_noise(rng, (h, w), 6)[..., None]
    skin = tone * (0.92 + 0.12 * blotch)
    return skin + rng.normal(0, 4, (h, w, 3)).astype(np.float32)


def _draw_hairs(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Dark curved hairs, the classic dermoscopy artefact."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(count):
        p0 = rng.uniform((0, 0), (w, h))
        p2 = rng.uniform((0, 0), (w, h))
        p1 = (p0 + p2) / 2 + rng.normal(0, w / 6, 2)
        t = np.linspace(0, 1, 16)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        shade = int(rng.integers(15, 60))
        draw.line([tuple(p) for p in curve], fill=(shade, shade - 5 if shade > 5 else 0, 0),
                  width=int(rng.integers(1, 3)))


def _photograph(rng: np.random.Generator, lesion: Image.Image, size: tuple[int, int],
                tone: np.ndarray) -> Image.Image:
    """One image of a lesion: new rotation, scale, shift, lighting, vignette and hairs."""
    w, h = size
    side = int(lesion.size[0] * rng.uniform(0.88, 1.1))
    view = lesion.resize((side, side), Image.Resampling.BILINEAR).rotate(
        rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
    background = Image.fromarray(np.clip(_skin(rng, size, tone), 0, 255).astype(np.uint8))
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    cy = h / 2 + rng.uniform(-0.08, 0.08) * h
    background.paste(view, (int(cx - side / 2), int(cy - side / 2)), view)
    _draw_hairs(rng, background, int(rng.integers(0, 5)))

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    vignette = 1 - rng.uniform(0.0, 0.35) * np.clip(r - 0.7, 0, None) ** 2 * 3
    light = rng.uniform(0.85, 1.12) * vignette[..., None]
    out = np.asarray(background, dtype=np.float32) * light
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_synthetic_ham10000(dest: Path, *, n_lesions_per_class: int = 40,
                             images_per_lesion: tuple[int, int] = (1, 3),
                             size: tuple[int, int] = (200, 150),
                             classes: tuple[str, ...] = ("nv", "bkl", "mel"), seed: int = 0) -> Path:
    """Write a synthetic HAM10000-like set into ``dest`` (Kaggle layout) and return ``dest``.

    ``images_per_lesion`` is an inclusive range; ``size`` is (width, height). The same arguments
    always give byte-identical files, so tests and demos are reproducible.
    """
    unknown = [c for c in classes if c not in CLASS_CODES]
    if unknown or not classes:
        raise BadInputError(f"unknown class code(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(CLASS_CODES)}")
    low, high = images_per_lesion
    if n_lesions_per_class < 1 or low < 1 or high < low:
        raise BadInputError("need at least one lesion per class and 1 <= images_per_lesion[0] <= [1]")
    if size[0] < 16 or size[1] < 16:
        raise BadInputError(f"image size {size[0]}x{size[1]} is too small (at least 16x16)")

    dest = Path(dest)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    lesion_no, image_no = 0, 0
    for dx in classes:
        style = STYLES[dx]
        for _ in range(n_lesions_per_class):
            lesion_no += 1
            lesion_id = f"HAM_{lesion_no:07d}"
            canvas = _lesion_canvas(rng, dx, int(min(size) * 0.95))
            tone = np.array([228, 184, 160], np.float32) * rng.uniform(0.85, 1.05, 3).astype(np.float32)
            meta = {"lesion_id": lesion_id, "dx": dx, "dx_type": str(rng.choice(style.dx_types)),
                    "age": f"{5 * int(rng.integers(4, 18))}.0", "sex": str(rng.choice(["male", "female"])),
                    "localization": str(rng.choice(LOCALIZATIONS))}
            for _ in range(int(rng.integers(low, high + 1))):
                image_no += 1
                rows.append({**meta, "image_id": f"ISIC_{image_no:07d}"})
                image = _photograph(rng, canvas, size, tone)
                part = 1 if image_no % 2 else 2
                atomic_write_bytes(dest / f"HAM10000_images_part_{part}" / f"ISIC_{image_no:07d}.jpg",
                                   _jpeg_bytes(image))
    order = rng.permutation(len(rows))  # Kaggle's CSV is grouped by lesion, not by class
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in order)
    atomic_write_bytes(dest / "HAM10000_metadata.csv", text.getvalue().encode())
    return dest
