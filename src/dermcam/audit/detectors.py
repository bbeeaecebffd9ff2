"""Where the known shortcuts of dermoscopy photos are in one image: small rules, each with a mask.

Dermoscopy classifiers are known to learn the photograph instead of the lesion: surgical ink markings
raise melanoma scores (Winkler et al., JAMA Dermatology 2019); rulers, the dark vignette of the
dermoscope's field, hair and colour patches act as shortcuts (Bissoto et al., 2019). The audit measures
how much of a class activation map's mass falls on each of these regions (:func:`mass_shares`), so each
region needs a mask, from the pixels alone (no segmentation model, no labels):

- ``border``: the outer band of the frame, :data:`BORDER_FRACTION` of the short side wide
  (:func:`border_band`); rulers and the field's edge live there, lesions rarely do.
- ``vignette``: near-black pixels (brightest channel at most :data:`VIGNETTE_DARK`) 8-connected to a
  corner of the frame (:func:`vignette_mask`): the dark outside of the dermoscope's circular field.
- ``ink``: saturated violet pixels (:func:`ink_mask`), the hue of surgical skin markers (gentian
  violet), which skin and melanin do not reach at that saturation (blood and violaceous lesions can).
- ``off_lesion``: everything farther than :data:`LESION_MARGIN` of the short side from a lesion mask
  found by the classic unsupervised rule (:func:`lesion_mask`: the lesion is darker than the skin
  around it: Otsu threshold of the brightness, the most central dark component, holes filled), with the cases
  where that rule is known to fail flagged (``ok`` False and a reason) rather than trusted.

Every rule is a few numpy/scipy.ndimage operations on one uint8 image at the cache size (a few
milliseconds for 256x192), sits in the ``data`` layer's company (no torch, nothing above ``data``) and
is tested on images drawn with known masks (tests/test_audit_detectors.py). docs/audit.md shows each
mask on an example and lists the failure cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dermcam.errors import BadInputError

REGIONS: tuple[str, ...] = ("border", "vignette", "ink", "off_lesion")

BORDER_FRACTION = 0.1  # the border band's width, a share of the short side (19 px at 256x192)
# Near-black: JPEG-compressed vignettes sit at 0-25; 40 leaves room for noise while staying below the
# darkest lesion pixels that reach a corner in practice. Only pixels connected to a corner count, so a
# black lesion in the middle of the frame is never "vignette".
VIGNETTE_DARK = 40
CORNER_FRACTION = 0.02  # the corner patches a vignette must touch, a share of the short side (at least 1 px)
# Ink: a violet hue (250 to 300 degrees) with the blue channel the largest, a saturation of at least 0.4
# and a chroma (max - min channel) of at least 60 of 255. Gentian violet (90, 40, 160) has hue 265,
# saturation 0.75, chroma 120; ink marks in HAM10000 measure hue 268-290, saturation 0.42-0.73. Pure
# blue (hue 220-250) is left out on purpose: blue nevi and the blue-white veil of melanomas sit there
# at the same saturation, and counting them as ink would tie "ink" to a diagnosis. Lilac skin is
# violet but pale (saturation under 0.2); blue-grey structures have a chroma of 20-50.
INK_HUE = (250.0, 300.0)
INK_SATURATION = 0.4
INK_CHROMA = 60
INK_MIN_AREA = 1e-4  # smaller ink components (a share of the frame, at least 3 px) are noise, dropped
INK_VIGNETTE_GAP = 0.02  # ink this close to the vignette (a share of the short side) is JPEG's colour fringe
# The lesion rule. Hair is suppressed first by a grey closing (a max then a min filter) of about this
# share of the short side (an odd number of cells of the shrunk image, at least 3: 6 px at 192), which
# erases dark lines thinner than it and keeps larger dark areas.
LESION_CLOSING = 0.025
LESION_WORK_SIDE = 96  # the rule runs on the image shrunk by a whole factor to about this short side
# The vignette's dim rim: a dermoscope's field darkens over several pixels before it turns black; this
# share of the short side around the vignette (10 px at 192) is left out of the lesion rule too.
VIGNETTE_RIM = 0.05
LESION_MIN_CONTRAST = 15.0  # Otsu's two classes must differ by this many grey levels, else "no contrast"
LESION_MAX_AREA = 0.6  # over this share of the visible skin: shading, or a lesion larger than the photo
LESION_MIN_AREA = 0.001  # under this share of the frame (49 px at 256x192) it is noise
LESION_MAX_BORDER = 0.25  # covering more of the frame's (or the field's) edge than this: shading or zoom
# off_lesion starts this share of the short side away from the lesion mask (19 px at 192): a CAM is
# computed on a grid of about 6x5 cells and upsampled, so a model looking exactly at a small lesion
# still spreads mass a cell's fraction around it; the margin keeps that from counting as off-lesion.
LESION_MARGIN = 0.1


@dataclass(frozen=True)
class LesionMask:
    """The unsupervised lesion mask and whether to trust it.

    ``mask`` is what the rule found (possibly empty); ``ok`` is False where the rule is known to fail,
    with ``reason`` saying which case: "no contrast", "no skin visible", "no dark region", "too small",
    "fills the frame", "touches the border". An audit should ignore the off-lesion share of such images
    rather than count a wrong mask as evidence.
    """

    mask: np.ndarray
    ok: bool
    reason: str | None


def check_pixels(pixels: object) -> np.ndarray:
    """``pixels`` as a uint8 (H, W, 3) array, or a one-line BadInputError saying what it is instead."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 \
            or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 2:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise BadInputError(f"expected uint8 RGB pixels of shape (H, W, 3), at least 2x2; got {got}")
    return pixels


def border_band(shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> np.ndarray:
    """True in the outer band of an (H, W) frame, ``fraction`` of the short side wide (at least 1 px)."""
    if not 0.0 < float(fraction) <= 0.5:
        raise BadInputError(f"border fraction {fraction!r} must be above 0 and at most 0.5")
    height, width = int(shape[0]), int(shape[1])
    band = max(1, round(fraction * min(height, width)))
    mask = np.ones((height, width), dtype=bool)
    mask[band:height - band, band:width - band] = False
    return mask


def _corner_patches(shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    side = max(1, round(CORNER_FRACTION * min(height, width)))
    patches = np.zeros((height, width), dtype=bool)
    for rows in (slice(0, side), slice(height - side, height)):
        for cols in (slice(0, side), slice(width - side, width)):
            patches[rows, cols] = True
    return patches


_SQUARE = np.ones((3, 3), dtype=bool)  # 8-connectivity


def _channel_max(pixels: np.ndarray) -> np.ndarray:
    # Channel by channel: numpy's reduction over a last axis of 3 is an order of magnitude slower.
    return np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])


def vignette_mask(pixels: np.ndarray) -> np.ndarray:
    """Near-black pixels 8-connected to a corner of the frame: the dark outside of the dermoscope's field.

    A 3x3 opening first drops dark specks and dark lines under 3 px wide (hairs), so a hair that runs
    into a black corner does not carry the vignette into the image.
    """
    check_pixels(pixels)
    dark = _channel_max(pixels) <= VIGNETTE_DARK
    corners = _corner_patches(dark.shape)
    if not (dark & corners).any():  # the usual case: no dark corner, nothing to label
        return np.zeros(dark.shape, dtype=bool)
    # Opening as a min then a max filter, the outside counted as dark (cval=1) so that a vignette is
    # not eroded away from the frame's edge.
    as_bytes = dark.view(np.uint8)
    opened = ndimage.maximum_filter(ndimage.minimum_filter(as_bytes, 3, mode="constant", cval=1), 3).view(bool) & dark
    labels, _ = ndimage.label(opened, structure=_SQUARE)
    seeds = np.unique(labels[corners])
    seeds = seeds[seeds > 0]
    return np.isin(labels, seeds) if seeds.size else np.zeros(dark.shape, dtype=bool)


def ink_mask(pixels: np.ndarray) -> np.ndarray:
    """Saturated violet pixels (:data:`INK_HUE`, :data:`INK_SATURATION`, :data:`INK_CHROMA`): surgical
    marker ink. Components under :data:`INK_MIN_AREA` of the frame are dropped as noise, and so is the
    coloured fringe JPEG leaves along a vignette's edge (:data:`INK_VIGNETTE_GAP`)."""
    check_pixels(pixels)
    return _ink(pixels, None)


def _ink(pixels: np.ndarray, vignette: np.ndarray | None) -> np.ndarray:
    red, green, blue = (pixels[..., c].astype(np.int16) for c in range(3))
    candidate = (blue >= red) & (blue >= green)
    chroma = blue - np.minimum(red, green)  # max - min where blue is the largest channel
    candidate &= chroma >= INK_CHROMA
    if not candidate.any():  # the usual case
        return candidate
    # HSV with blue the largest channel: hue = 240 + 60 (R - G) / chroma, saturation = chroma / max.
    hue = 240.0 + 60.0 * (red - green) / np.maximum(chroma, 1).astype(np.float32)
    found = candidate & (hue >= INK_HUE[0]) & (hue <= INK_HUE[1]) & (chroma >= INK_SATURATION * blue)
    if vignette is None:
        vignette = vignette_mask(pixels)
    if found.any() and vignette.any():
        gap = 2 * max(1, round(INK_VIGNETTE_GAP * min(found.shape))) + 1
        found &= ~ndimage.maximum_filter(vignette.view(np.uint8), gap).view(bool)
    return _drop_small(found, max(3, round(INK_MIN_AREA * found.size)))


def _drop_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_pixels`` pixels."""
    if not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=_SQUARE)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _brightness(pixels: np.ndarray) -> np.ndarray:
    """Rec. 601 luma, (77 R + 150 G + 29 B) / 256, as uint16 (at most 255)."""
    rgb = [pixels[..., c].astype(np.uint16) for c in range(3)]
    return (77 * rgb[0] + 150 * rgb[1] + 29 * rgb[2] + 128) >> 8


def _factor(shape: tuple[int, int]) -> int:
    """How much the lesion rule shrinks an image first: to about :data:`LESION_WORK_SIDE` on the short side."""
    return max(1, min(shape) // LESION_WORK_SIDE)


def _shrink(values: np.ndarray, factor: int, how: str) -> np.ndarray:
    """``values`` (H, W) in blocks of ``factor`` x ``factor``: their mean (uint8) or ``any`` (bool)."""
    if factor == 1:
        return values.astype(np.uint8) if how == "mean" else values
    height, width = values.shape[0] // factor, values.shape[1] // factor
    blocks = values[:height * factor, :width * factor].reshape(height, factor, width, factor)
    if how == "any":
        return blocks.any(axis=(1, 3))
    return (blocks.sum(axis=(1, 3), dtype=np.uint32) // (factor * factor)).astype(np.uint8)


def _grow(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A shrunken mask back at ``shape``: each cell repeated, leftover rows and columns copied from the edge."""
    if factor > 1:
        mask = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    pad = ((0, shape[0] - mask.shape[0]), (0, shape[1] - mask.shape[1]))
    return np.pad(mask, pad, mode="edge") if pad[0][1] or pad[1][1] else mask


def _otsu(values: np.ndarray) -> tuple[int, float, float]:
    """Otsu's threshold of uint8 ``values`` (the dark class is ``<= threshold``) and both class means."""
    hist = np.bincount(values, minlength=256).astype(np.float64)
    prob = hist / hist.sum()
    omega = np.cumsum(prob)
    mu = np.cumsum(prob * np.arange(hist.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    threshold = int(np.argmax(between))
    low = mu[threshold] / omega[threshold] if omega[threshold] > 0 else 0.0
    high = (mu[-1] - mu[threshold]) / (1.0 - omega[threshold]) if omega[threshold] < 1 else 255.0
    return threshold, float(low), float(high)


def _centrality(shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's weight when dark components compete: ``1 - r**2`` (at least 0), ``r`` the elliptical
    distance from the centre (1 at the middle of each edge). Photos are framed on the lesion, so a
    central component beats a shaded corner of the same size, and a large lesion running off the
    frame still wins by its central part."""
    rows = (np.arange(shape[0]) + 0.5) / shape[0] * 2.0 - 1.0
    cols = (np.arange(shape[1]) + 0.5) / shape[1] * 2.0 - 1.0
    return np.maximum(0.0, 1.0 - rows[:, None] ** 2 - cols[None, :] ** 2)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the frame's edge filled (one labelling,
    several times faster than scipy's binary_fill_holes)."""
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    hole = np.ones(count + 1, dtype=bool)
    hole[outside] = False
    hole[0] = False
    return mask | hole[labels]


def _dilate(mask: np.ndarray, reach: float) -> np.ndarray:
    """``mask`` grown by a disc of radius ``reach`` pixels (Euclidean distance on a grid shrunk like the
    lesion rule's, so a few pixels coarse; cheap where scipy's full-size distance transform is not)."""
    if reach <= 0 or not mask.any():
        return mask
    factor = _factor(mask.shape)
    small = _shrink(mask, factor, "any")
    return _grow(ndimage.distance_transform_edt(~small) <= reach / factor, factor, mask.shape)


def lesion_mask(pixels: np.ndarray) -> LesionMask:
    """The classic unsupervised lesion mask: the lesion is the central region darker than the skin.

    The rule, on the image shrunk by a whole factor to about :data:`LESION_WORK_SIDE` pixels on its
    short side (the mask is a few pixels coarse, far finer than any class activation map): brightness
    (luma); hair erased by a grey closing (:data:`LESION_CLOSING`); the vignette with its dim rim
    (:data:`VIGNETTE_RIM`) and the ink left out; Otsu's threshold of the rest; of its 4-connected dark
    components the one with the most weight near the centre (:func:`_centrality`), its holes filled (a
    regression zone or a bright centre stays inside). Flagged, not trusted (``ok`` False): no contrast
    between the two classes (:data:`LESION_MIN_CONTRAST`), a component under :data:`LESION_MIN_AREA`
    of the frame or over :data:`LESION_MAX_AREA` of the skin, one covering more than
    :data:`LESION_MAX_BORDER` of the edge of what the camera saw (uneven lighting, or a lesion larger
    than the photo).
    """
    check_pixels(pixels)
    vignette = vignette_mask(pixels)
    return _lesion(pixels, vignette, _ink(pixels, vignette))


def _lesion(pixels: np.ndarray, vignette: np.ndarray, ink: np.ndarray) -> LesionMask:
    shape = pixels.shape[:2]
    empty = np.zeros(shape, dtype=bool)
    factor = _factor(shape)
    grey = _shrink(_brightness(pixels), factor, "mean")
    small_shape = grey.shape
    field_out = _shrink(vignette, factor, "any")
    if field_out.any():  # the vignette and its dim rim, which is dark without being lesion
        field_out = ndimage.distance_transform_edt(~field_out) <= max(1.0, VIGNETTE_RIM * min(shape) / factor)
    skin = ~(field_out | _shrink(ink, factor, "any"))
    if skin.sum() < max(16, LESION_MIN_AREA * skin.size):
        return LesionMask(empty, False, "no skin visible")
    side = max(3, 2 * round(LESION_CLOSING * min(shape) / factor / 2) + 1)  # odd, at least 3
    grey = ndimage.minimum_filter(ndimage.maximum_filter(grey, side), side)  # grey closing: hair erased
    values = grey[skin]
    if int(values.max()) - int(values.min()) < LESION_MIN_CONTRAST:
        return LesionMask(empty, False, "no contrast")
    threshold, low, high = _otsu(values)
    if high - low < LESION_MIN_CONTRAST:
        return LesionMask(empty, False, "no contrast")
    labels, count = ndimage.label((grey <= threshold) & skin)
    if count == 0:
        return LesionMask(empty, False, "no dark region")
    scores = np.bincount(labels.ravel(), weights=_centrality(small_shape).ravel())
    scores[0] = -1.0
    small = _fill_holes(labels == int(np.argmax(scores))) & skin
    mask = _grow(small, factor, shape) & ~vignette & ~ink
    area = float(small.sum())
    if area < LESION_MIN_AREA * small.size:
        return LesionMask(mask, False, "too small")
    if area > LESION_MAX_AREA * float(skin.sum()):
        return LesionMask(mask, False, "fills the frame")
    # The edge of what the camera saw: the frame's outer cells and the skin next to the vignette's rim.
    edge = border_band(small_shape, 1.0 / min(small_shape))
    if field_out.any():
        edge |= ndimage.maximum_filter(field_out.view(np.uint8), 3).view(bool)
    edge &= skin
    if edge.any() and (small & edge).sum() > LESION_MAX_BORDER * edge.sum():
        return LesionMask(mask, False, "touches the border")
    return LesionMask(mask, True, None)


def region_masks(pixels: np.ndarray, *, border: float = BORDER_FRACTION,
                 margin: float = LESION_MARGIN) -> tuple[dict[str, np.ndarray], LesionMask]:
    """Every region of :data:`REGIONS` for one image, and the lesion mask behind ``off_lesion``, in one
    call (the vignette and ink are found once and reused by the lesion rule).

    ``off_lesion`` is everything farther than ``margin`` of the short side from the lesion mask,
    whether or not the mask is ``ok``: the caller decides from the returned :class:`LesionMask` whether
    to use it (an empty mask makes the whole frame off-lesion). Regions overlap (a vignette corner is
    also border and off-lesion), so their shares do not add up to 1.
    """
    check_pixels(pixels)
    shape = pixels.shape[:2]
    vignette = vignette_mask(pixels)
    ink = _ink(pixels, vignette)
    lesion = _lesion(pixels, vignette, ink)
    near = _dilate(lesion.mask, margin * min(shape))
    masks = {"border": border_band(shape, border), "vignette": vignette, "ink": ink, "off_lesion": ~near}
    return masks, lesion


def mass_shares(cam: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The share of ``cam``'s total mass inside each mask, in ``masks``' order.

    ``cam`` is a non-negative (H, W) map at the masks' size (negative or non-finite values count as 0);
    a map with no mass gives 0.0 for every region rather than a division by zero.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise BadInputError(f"expected a 2-D class activation map, got shape {cam.shape}")
    for name, mask in masks.items():
        if np.shape(mask) != cam.shape:
            raise BadInputError(f"region '{name}' has shape {np.shape(mask)}, the map {cam.shape}")
    cam = np.where(np.isfinite(cam) & (cam > 0), cam, 0.0)
    total = float(cam.sum())
    if total <= 0.0:
        return {name: 0.0 for name in masks}
    return {name: float(min(1.0, cam[np.asarray(mask, dtype=bool)].sum() / total)) for name, mask in masks.items()}
