"""The audit's detectors on images drawn with known masks: each rule finds what was drawn, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from dermcam.audit.detectors import (
    REGIONS,
    LesionMask,
    border_band,
    ink_mask,
    lesion_mask,
    mass_shares,
    region_masks,
    vignette_mask,
)
from dermcam.errors import BadInputError

SKIN = (214, 162, 142)
BROWN = (118, 72, 52)


def skin(height: int = 192, width: int = 256, seed: int = 0, colour: tuple[int, int, int] = SKIN) -> np.ndarray:
    """A skin-coloured frame with a little pixel noise, as a photo has."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 3.0, size=(height, width, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def outside_circle(shape: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return np.hypot(rows - (shape[0] - 1) / 2, cols - (shape[1] - 1) / 2) > radius


def paint(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    out = pixels.copy()
    noise = np.random.default_rng(seed).normal(0.0, 4.0, size=(int(mask.sum()), 3))
    out[mask] = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def stroke(shape: tuple[int, int], start: tuple[float, float], end: tuple[float, float], width: float) -> np.ndarray:
    """Pixels within width/2 of the segment start -> end (row, col)."""
    rows, cols = np.mgrid[:shape[0], :shape[1]].astype(float)
    direction = np.subtract(end, start)
    t = np.clip(((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1]) / (direction @ direction), 0, 1)
    return np.hypot(rows - start[0] - t * direction[0], cols - start[1] - t * direction[1]) <= width / 2


@pytest.mark.parametrize("centre, radii", [((96, 128), (40, 55)), ((80, 150), (25, 30)), ((100, 110), (60, 80)),
                                           ((96, 128), (12, 14))])
def test_the_lesion_mask_finds_a_darker_ellipse(centre, radii) -> None:
    drawn = ellipse((192, 256), centre, radii)
    found = lesion_mask(paint(skin(), drawn, BROWN))
    assert found.ok and found.reason is None
    assert found.mask.dtype == bool and found.mask.shape == (192, 256)
    assert iou(found.mask, drawn) > 0.8


def test_the_lesion_mask_ignores_hair_vignette_and_ink() -> None:
    shape = (192, 256)
    drawn = ellipse(shape, (96, 128), (35, 50))
    image = paint(skin(), drawn, BROWN)
    for start, end in [((0, 20), (191, 90)), ((10, 255), (180, 0)), ((0, 140), (191, 200))]:
        image[stroke(shape, start, end, 1.5)] = (40, 30, 25)  # dark hairs across skin and lesion
    corners = outside_circle(shape, 125)
    image[corners] = (6, 6, 6)
    ink = stroke(shape, (60, 30), (140, 40), 4)
    image[ink] = (90, 40, 160)
    found = lesion_mask(image)
    assert found.ok
    assert iou(found.mask, drawn) > 0.8
    assert not (found.mask & corners).any() and not (found.mask & ink).any()


def test_the_lesion_mask_works_on_small_images() -> None:
    drawn = ellipse((48, 48), (24, 24), (10, 12))
    found = lesion_mask(paint(skin(48, 48), drawn, BROWN))
    assert found.ok and iou(found.mask, drawn) > 0.8


def test_a_uniform_image_has_no_trusted_lesion() -> None:
    found = lesion_mask(skin())
    assert isinstance(found, LesionMask)
    assert not found.ok and found.reason == "no contrast"
    flat = lesion_mask(np.full((192, 256, 3), 180, dtype=np.uint8))
    assert not flat.ok and flat.reason == "no contrast" and not flat.mask.any()


def test_the_known_failure_cases_are_flagged() -> None:
    black = lesion_mask(np.zeros((64, 64, 3), dtype=np.uint8))  # the whole frame is vignette
    assert not black.ok and black.reason == "no skin visible"
    huge = lesion_mask(paint(skin(), ellipse((192, 256), (96, 128), (90, 125)), BROWN))
    assert not huge.ok and huge.reason == "fills the frame"
    shaded = skin()
    shaded[:, :90] = paint(skin(), np.ones((192, 256), dtype=bool), BROWN)[:, :90]  # a dark band down one side
    left = lesion_mask(shaded)
    assert not left.ok and left.reason == "touches the border"
    speck = lesion_mask(paint(skin(), ellipse((192, 256), (96, 128), (2, 2)), BROWN))
    assert not speck.ok and speck.reason in ("too small", "no dark region", "no contrast")


def test_the_vignette_mask_matches_the_dark_field() -> None:
    shape = (192, 256)
    dark = outside_circle(shape, 120)
    image = paint(skin(), dark, (8, 8, 8))
    found = vignette_mask(image)
    assert found.dtype == bool and iou(found, dark) > 0.95
    assert not vignette_mask(skin()).any()


def test_the_vignette_needs_a_corner() -> None:
    shape = (192, 256)
    black_lesion = ellipse(shape, (96, 128), (40, 50))
    assert not vignette_mask(paint(skin(), black_lesion, (10, 8, 8))).any()
    # A black hair running into a black corner does not carry the vignette into the image.
    image = paint(skin(), outside_circle(shape, 140), (5, 5, 5))
    hair = stroke(shape, (0, 0), (150, 200), 1.5)
    image[hair] = (5, 5, 5)
    found = vignette_mask(image)
    assert not (found & hair & ~outside_circle(shape, 140)).any()
    assert found[0, 0] and found[-1, -1]


def test_the_ink_mask_finds_a_violet_stroke() -> None:
    shape = (192, 256)
    mark = stroke(shape, (40, 30), (150, 60), 4)
    image = paint(paint(skin(), ellipse(shape, (96, 150), (40, 50)), BROWN), mark, (90, 40, 160))
    found = ink_mask(image)
    assert (found & mark).sum() > 0.9 * mark.sum()
    assert not (found & ~mark).any()


@pytest.mark.parametrize("colour", [SKIN, BROWN, (230, 150, 160), (200, 180, 215), (120, 130, 150), (70, 80, 110),
                                    (40, 30, 30), (160, 40, 60)])
def test_the_ink_mask_is_silent_on_skin_and_lesions(colour) -> None:
    """Skin, a brown or pink lesion, lilac skin, a blue-grey veil, a blue nevus, a black or red lesion."""
    image = paint(skin(), ellipse((192, 256), (96, 128), (40, 55)), colour)
    assert not ink_mask(image).any()


def test_border_band() -> None:
    band = border_band((192, 256), 0.1)
    assert band.shape == (192, 256) and band.dtype == bool
    assert band[18, 128] and not band[19, 128] and band[96, 237] and not band[96, 236]
    assert border_band((4, 4), 0.01).sum() == 12  # at least one pixel wide
    with pytest.raises(BadInputError):
        border_band((10, 10), 0.0)


def test_region_masks_gives_every_region_at_once() -> None:
    shape = (192, 256)
    drawn = ellipse(shape, (96, 128), (30, 40))
    image = paint(paint(skin(), drawn, BROWN), outside_circle(shape, 130), (5, 5, 5))
    masks, lesion = region_masks(image)
    assert tuple(masks) == REGIONS
    assert all(m.shape == shape and m.dtype == bool for m in masks.values())
    assert lesion.ok and iou(lesion.mask, drawn) > 0.8
    assert not (masks["off_lesion"] & drawn).any()  # the lesion and its margin are not off-lesion
    assert not masks["off_lesion"][96, 128 + 40 + 15]  # within the margin (19 px at 192)
    assert masks["off_lesion"][96, 128 + 40 + 25] and masks["off_lesion"][5, 5]
    assert masks["vignette"][0, 0] and not masks["vignette"][96, 128]
    assert not masks["ink"].any()
    assert np.array_equal(masks["vignette"], vignette_mask(image))


def test_mass_shares() -> None:
    shape = (192, 256)
    image = paint(paint(skin(), ellipse(shape, (96, 128), (30, 40)), BROWN), outside_circle(shape, 130), (5, 5, 5))
    masks, _ = region_masks(image)
    corners = np.zeros(shape)
    for rows in (slice(0, 12), slice(-12, None)):
        for cols in (slice(0, 12), slice(-12, None)):
            corners[rows, cols] = 1.0
    shares = mass_shares(corners, masks)
    assert list(shares) == list(REGIONS)
    assert shares["border"] == pytest.approx(1.0) and shares["vignette"] > 0.95
    assert shares["off_lesion"] == pytest.approx(1.0) and shares["ink"] == 0.0
    on_lesion = ellipse(shape, (96, 128), (25, 35)).astype(float)
    assert mass_shares(on_lesion, masks)["off_lesion"] == 0.0
    assert mass_shares(np.zeros(shape), masks) == {name: 0.0 for name in REGIONS}
    half = np.zeros(shape)
    half[:, :128] = 1.0
    assert mass_shares(half, {"left": half > 0})["left"] == pytest.approx(1.0)
    assert mass_shares(np.ones(shape), {"left": half > 0})["left"] == pytest.approx(0.5)
    with pytest.raises(BadInputError, match="shape"):
        mass_shares(np.ones((10, 10)), masks)


def test_bad_pixels_are_one_line_errors() -> None:
    with pytest.raises(BadInputError, match="uint8"):
        region_masks(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(BadInputError, match="uint8"):
        lesion_mask(np.zeros((10, 10), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(2, 2), (2, 40), (5, 70), (32, 32)])
def test_tiny_and_thin_frames_give_masks_of_their_shape(shape) -> None:
    """The engine's tests run on 32x32 images; nothing may fail on a frame that small or thinner."""
    for image in (np.zeros((*shape, 3), np.uint8), skin(*shape), np.full((*shape, 3), (90, 40, 160), np.uint8)):
        masks, lesion = region_masks(image)
        assert all(m.shape == shape for m in masks.values()) and lesion.mask.shape == shape
