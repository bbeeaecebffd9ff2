"""Reading image files: one decoder for ``prepare`` and ``explain``, with one-line errors.

Images are read with EXIF orientation applied (phone dermatoscopes store rotated JPEGs), 16-bit and
float images are scaled to 8 bits over their full range, and transparency is dropped.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermcam.data.fingerprint import fingerprint
from dermcam.data.geometry import cover_resize
from dermcam.errors import BadInputError, first_line

# 64 megapixels: three times the largest dermatoscope photos; anything bigger is refused before it
# is decoded (a tiny file can claim gigapixels and exhaust memory: a "decompression bomb")
MAX_IMAGE_PIXELS = 64_000_000
# The fingerprint is computed from a JPEG draft of at least this many pixels a side (its views are
# reduced to 64-128 pixels before their 16x16 thumbnails), never from a cache-sized 1/8 draft.
FINGERPRINT_DRAFT = 128


_MODE_NAMES = {"1": "1-bit", "L": "grayscale", "LA": "grayscale+alpha", "P": "palette",
               "PA": "palette+alpha", "RGBA": "RGBA (alpha dropped)", "CMYK": "CMYK", "I": "32-bit integer",
               "F": "32-bit float", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}


class ImageDecodeError(BadInputError):
    """An image file dermcam cannot decode; ``kind`` is ``truncated``, ``unreadable`` or ``too_large``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_pixels(image: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image whose header claims more than MAX_IMAGE_PIXELS.

    The one size check of ``prepare`` and ``explain``: a header is cheap to read, decoding it is not.
    """
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS // 1_000_000} MP "
                               "limit (possible decompression bomb)", "too_large")


def conversion_note(image: Image.Image) -> str | None:
    """What converting this (unloaded) image to 8-bit RGB changes, or None for 8-bit RGB."""
    rawmode = ""
    if image.tile and image.tile[0].args and isinstance(image.tile[0].args[0], str):
        rawmode = image.tile[0].args[0]
    sixteen = image.mode.startswith("I;16") or ";16" in rawmode
    if image.mode == "RGB" and not sixteen:
        return None
    name = "16-bit grayscale" if image.mode.startswith("I;16") else _MODE_NAMES.get(image.mode, image.mode)
    if image.mode == "RGB":
        name = "16-bit RGB"
    return f"{name} converted to 8-bit RGB"


def conversion_note_of(path: Path) -> str | None:
    """:func:`conversion_note` from the file's header alone (nothing is decoded)."""
    with Image.open(path) as image:
        return conversion_note(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; alpha is dropped.

    High-bit-depth grey is rescaled from its full range (16-bit: x 255/65535; floats in [0, 1]: x 255),
    never clipped at 255 as Pillow's ``convert`` does, and never stretched by the image's own min/max,
    which would change the contrast from one photo to the next.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        top = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or top > 255:
            values = values * (255.0 / 65535.0)
        elif image.mode == "F" and top <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(source: Path | bytes, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """Decode one image file to a uint8 H x W x 3 array of ``size`` = (W, H), as the cache holds it.

    Returns the array and a note saying what was converted (None for a plain 8-bit RGB file), so
    ``prepare`` can report it. JPEGs are decoded directly at a reduced scale (``draft``), several
    times faster than decoding at full size and resizing.
    """
    pixels, note, _ = _decode(source, size, with_fingerprint=False)
    return pixels, note


def decode_with_fingerprint(source: Path | bytes, size: tuple[int, int]) -> tuple[np.ndarray, str | None, np.ndarray]:
    """:func:`decode_image` plus the image's near-duplicate fingerprint, in one decode (two for a cache
    under FINGERPRINT_DRAFT pixels a side).

    The fingerprint is taken from the upright image before the cover crop (a crop of a rotated photo
    keeps another part of it: :mod:`dermcam.data.fingerprint`), from a JPEG draft of at least
    FINGERPRINT_DRAFT pixels a side, so it does not depend on the cache size.
    """
    pixels, note, row = _decode(source, size, with_fingerprint=True)
    assert row is not None  # with_fingerprint=True always computes it
    return pixels, note, row


def _decode(source: Path | bytes, size: tuple[int, int],
            with_fingerprint: bool) -> tuple[np.ndarray, str | None, np.ndarray | None]:
    """The one decoder behind :func:`decode_image` and :func:`decode_with_fingerprint`, errors as
    :class:`ImageDecodeError`. Everything happens inside ``with``: a closed Pillow image has no pixels.

    The fingerprint's JPEG draft is at least FINGERPRINT_DRAFT pixels a side whatever the cache size,
    so a set cached at 16x12 fingerprints as one at 256x192 does (what a data set overlap compares);
    the cache row is then decoded once more at its own draft, the pixels decode_image gives.
    """
    draft = (max(size[0], FINGERPRINT_DRAFT), max(size[1], FINGERPRINT_DRAFT)) if with_fingerprint else size
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(handle) as image:
            check_pixels(image)
            note = conversion_note(image)
            image.draft("RGB", draft)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            upright = to_rgb(image)
            fingerprint_row = fingerprint(upright) if with_fingerprint else None
            array = np.asarray(cover_resize(upright, size), dtype=np.uint8) if draft == size else None
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image Pillow can read", "unreadable") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own cap, raised while opening
        raise ImageDecodeError(f"refused as a possible decompression bomb ({first_line(exc)})", "too_large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        message = first_line(exc)
        kind = "truncated" if "truncated" in message.lower() else "unreadable"
        raise ImageDecodeError(message, kind) from exc
    if array is None:  # a cache smaller than the fingerprint's draft (tests, tiny caches)
        array, _, _ = _decode(source, size, with_fingerprint=False)
    return array, note, fingerprint_row


def load_image(path: Path) -> Image.Image:
    """A photo at full size as upright 8-bit RGB, or :class:`BadInputError` with a one-line reason naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixels(image)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInputError(f"{path}: refused as a possible decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise BadInputError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, unreadable, permission, broken header
        raise BadInputError(f"{path}: cannot read image ({first_line(exc)})") from None


