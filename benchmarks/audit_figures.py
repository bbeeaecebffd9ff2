"""The figure of docs/audit.md (each detector's mask and each perturbation on one photo), and the per-call
cost of the audit's image functions.

The photo is ISIC_0027734 of ../shared/data/ham10000-lite (a lesion with a violet ink mark and hair,
CC BY-NC-SA 4.0, Tschandl et al. 2018) decoded at the default cache size, or a synthetic lesion when
the data is absent. Only the one derived figure goes into the repository.

    python benchmarks/audit_figures.py            # writes docs/audit/detectors_and_perturbations.jpg
    python benchmarks/audit_figures.py --time     # also prints ms per call (process CPU time, median of 5)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LITE  # noqa: E402
from dermcam.audit.detectors import ink_mask, lesion_mask, region_masks, vignette_mask  # noqa: E402
from dermcam.audit.perturb import PERTURBATIONS, perturb  # noqa: E402
from dermcam.data.geometry import DEFAULT_CACHE_SIZE  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "audit" / "detectors_and_perturbations.jpg"
PHOTO = "ISIC_0027734"
TILE = (192, 144)  # each panel, width x height
LABEL = 16  # the caption strip above each panel, in pixels


def photo() -> tuple[np.ndarray, str]:
    """The example photo at the cache size, and where it came from."""
    from dermcam.data.images import decode_image

    found = sorted(LITE.glob(f"*/{PHOTO}.jpg")) if LITE.is_dir() else []
    if found:
        return decode_image(found[0], DEFAULT_CACHE_SIZE)[0], f"{PHOTO} (HAM10000)"
    width, height = DEFAULT_CACHE_SIZE
    rng = np.random.default_rng(0)
    rows, cols = np.ogrid[:height, :width]
    lesion = ((rows - 100) / 50) ** 2 + ((cols - 140) / 60) ** 2 <= 1
    image = np.where(lesion[..., None], [130, 80, 60], [205, 160, 170]) + rng.normal(0, 5, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), "synthetic"


def tint(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], strength: float = 0.6) -> np.ndarray:
    out = pixels.astype(np.float32)
    out[mask] = (1 - strength) * out[mask] + strength * np.array(colour, dtype=np.float32)
    return out.astype(np.uint8)


def outline(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    out = pixels.copy()
    out[mask & ~inner] = colour
    return out


def panels(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(caption, pixels) for every panel: the photo, the detectors, then the sixteen perturbations."""
    masks, lesion = region_masks(image)
    off = tint(image, masks["off_lesion"], (40, 40, 40), 0.55)
    off = outline(off, lesion.mask, (0, 230, 0))
    ink_border = tint(tint(image, masks["border"], (0, 120, 255), 0.35), masks["ink"], (255, 0, 255), 0.9)
    vignetted = perturb(image, "vignette", seed=0, index=0, lesion=lesion.mask)
    vignette = tint(vignetted, vignette_mask(vignetted), (0, 90, 255), 0.8)
    state = "ok" if lesion.ok else f"not ok: {lesion.reason}"
    shown = [("photo", image), (f"lesion ({state}), off_lesion dim", off), ("ink (magenta), border (blue)", ink_border),
             ("vignette mask (painted field)", vignette)]
    for name in PERTURBATIONS:
        shown.append((name, perturb(image, name, seed=0, index=0, lesion=lesion.mask)))
    return shown


def figure(shown: list[tuple[str, np.ndarray]], columns: int = 4) -> Image.Image:
    rows = -(-len(shown) // columns)
    sheet = Image.new("RGB", (columns * TILE[0], rows * (TILE[1] + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, pixels) in enumerate(shown):
        left, top = (i % columns) * TILE[0], (i // columns) * (TILE[1] + LABEL)
        sheet.paste(Image.fromarray(pixels).resize(TILE, Image.Resampling.LANCZOS), (left, top + LABEL))
        draw.text((left + 3, top + 2), caption, fill=(0, 0, 0))
    return sheet


def cpu_ms(fn, repeats: int = 5, number: int = 50) -> float:
    """Median over ``repeats`` of the process CPU time per call, in milliseconds: CPU time, not wall time,
    so another process on the machine slows the numbers less."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(number):
            fn()
        times.append((time.process_time() - start) / number * 1000)
    return statistics.median(times)


def timings(image: np.ndarray) -> None:
    lesion = lesion_mask(image).mask
    rows = [("region_masks", cpu_ms(lambda: region_masks(image))), ("lesion_mask", cpu_ms(lambda: lesion_mask(image))),
            ("vignette_mask", cpu_ms(lambda: vignette_mask(image))), ("ink_mask", cpu_ms(lambda: ink_mask(image)))]
    rows += [(name, cpu_ms(lambda name=name: perturb(image, name, seed=0, index=1, lesion=lesion)))
             for name in PERTURBATIONS]
    for name, ms in rows:
        print(f"{name:16s} {ms:6.2f} ms")
    print(f"{'all 16 perturbations':16s} {sum(ms for _, ms in rows[4:]):6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--time", action="store_true", help="also print the CPU milliseconds per call")
    args = parser.parse_args()
    image, source = photo()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # JPEG at quality 90: a fifth of the PNG's bytes, and no visible change at this size (the jpeg30
    # panel's blocks stay as they are).
    figure(panels(image)).save(args.out, quality=90, optimize=True)
    print(f"written {args.out} from {source}")
    if args.time:
        timings(image)


if __name__ == "__main__":
    main()
