"""The audit's perturbations: same shape and type, input untouched, seeded, and each does what it says."""

from __future__ import annotations

import numpy as np
import pytest

from dermcam.audit.detectors import ink_mask, vignette_mask
from dermcam.audit.perturb import PERTURBATIONS, Perturbation, perturb
from dermcam.errors import BadInputError

NAMES = ["ink", "ruler", "vignette", "hair", "rot90", "rot180", "rot270", "hflip", "vflip", "brighter", "darker",
         "more_contrast", "less_contrast", "jpeg30", "blur", "half_res"]
ARTEFACTS = NAMES[:4]


def photo(height: int = 192, width: int = 256, seed: int = 0) -> np.ndarray:
    """Mid-tone skin with a darker lesion and some texture: no channel near 0 or 255."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:height, :width]
    lesion = ((rows - height / 2) / (height / 5)) ** 2 + ((cols - width / 2) / (width / 5)) ** 2 <= 1
    image = np.where(lesion[..., None], [120, 80, 60], [190, 140, 125]) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 30, 225).astype(np.uint8)


def lesion_of(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def test_the_perturbations_are_the_documented_sixteen_in_order() -> None:
    assert list(PERTURBATIONS) == NAMES
    assert all(isinstance(p, Perturbation) and p.name == name for name, p in PERTURBATIONS.items())
    assert [p.kind for p in PERTURBATIONS.values()] == ["artefact"] * 4 + ["acquisition"] * 12
    assert all(p.description and "\n" not in p.description for p in PERTURBATIONS.values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(192, 256), (48, 48), (33, 47), (2, 40)])
def test_shape_and_type_kept_input_untouched_and_seeded(name: str, shape: tuple[int, int]) -> None:
    image = photo(*shape)
    before = image.copy()
    lesion = lesion_of(shape, (shape[0] / 2, shape[1] / 2), (shape[0] / 5, shape[1] / 5))
    out = perturb(image, name, seed=3, index=7, lesion=lesion)
    assert out.shape == image.shape and out.dtype == np.uint8 and out is not image
    assert np.array_equal(image, before)
    assert out.tobytes() == perturb(image, name, seed=3, index=7, lesion=lesion).tobytes()
    out[0, 0] = 0  # a new array, not a view of the input
    assert np.array_equal(image, before)


@pytest.mark.parametrize("name", ARTEFACTS)
def test_each_image_gets_its_own_artefact(name: str) -> None:
    image = photo()
    first = perturb(image, name, seed=0, index=0)
    assert not np.array_equal(first, image)
    assert not np.array_equal(first, perturb(image, name, seed=0, index=1))
    assert not np.array_equal(first, perturb(image, name, seed=1, index=0))


@pytest.mark.parametrize("name", NAMES[4:])
def test_acquisition_changes_do_not_depend_on_the_seed(name: str) -> None:
    image = photo()
    assert np.array_equal(perturb(image, name, seed=0, index=0), perturb(image, name, seed=5, index=9))


@pytest.mark.parametrize("centre, radii", [((96, 128), (30, 40)), ((40, 60), (30, 50)), ((96, 128), (80, 110)),
                                           ((150, 220), (20, 20))])
def test_the_ink_mark_is_beside_the_lesion_never_on_it(centre, radii) -> None:
    image = photo()
    lesion = lesion_of(image.shape[:2], centre, radii)
    for index in range(12):
        out = perturb(image, "ink", seed=0, index=index, lesion=lesion)
        changed = (out != image).any(axis=2)
        assert changed.sum() > 20
        assert not (changed & lesion).any()
        rows, cols = np.nonzero(changed)
        box_rows, box_cols = np.nonzero(lesion)
        near = 0.25 * min(image.shape[:2])  # the mark sits within a quarter of the short side of the lesion's box
        assert rows.min() >= box_rows.min() - near and rows.max() <= box_rows.max() + near
        assert cols.min() >= box_cols.min() - near and cols.max() <= box_cols.max() + near
        assert ink_mask(out).sum() > 0.3 * changed.sum()  # violet enough for the ink detector


def test_without_a_lesion_mask_the_ink_goes_beside_the_centre() -> None:
    image = photo()
    out = perturb(image, "ink", seed=0, index=0)
    changed = (out != image).any(axis=2)
    centre = np.zeros(changed.shape, dtype=bool)
    centre[int(0.3 * 192):int(0.7 * 192), int(0.3 * 256):int(0.7 * 256)] = True
    assert changed.any() and not (changed & centre).any()


def test_rotations_and_flips() -> None:
    image = photo()
    twice = perturb(perturb(image, "rot180", seed=0, index=0), "rot180", seed=0, index=0)
    assert np.array_equal(twice, image)
    assert np.array_equal(perturb(image, "hflip", seed=0, index=0), image[:, ::-1])
    assert np.array_equal(perturb(image, "vflip", seed=0, index=0), image[::-1])
    square = photo(64, 64)
    assert np.array_equal(perturb(square, "rot90", seed=0, index=0), np.rot90(square))
    back = perturb(perturb(square, "rot90", seed=0, index=0), "rot270", seed=0, index=0)
    assert np.array_equal(back, square)
    # A quarter turn of a 4:3 image covers the frame again: a centre crop of the rotated image, scaled up.
    turned = perturb(image, "rot90", seed=0, index=0)
    assert turned.shape == image.shape
    scale = 256 / 192
    assert abs(float(turned.mean()) - float(np.rot90(image)[int(128 - 96 / scale):int(128 + 96 / scale)].mean())) < 3


def test_brightness_and_contrast_move_by_twenty_percent() -> None:
    image = photo()
    mean, std = float(image.mean()), float(image.std())
    for name, factor in (("brighter", 1.2), ("darker", 0.8)):
        assert float(perturb(image, name, seed=0, index=0).mean()) == pytest.approx(factor * mean, rel=0.01)
    for name, factor in (("more_contrast", 1.2), ("less_contrast", 0.8)):
        out = perturb(image, name, seed=0, index=0)
        assert float(out.std()) == pytest.approx(factor * std, rel=0.02)
        assert float(out.mean()) == pytest.approx(mean, abs=0.5)


def test_jpeg_blur_and_half_resolution_are_mild() -> None:
    image = photo()
    for name in ("jpeg30", "blur", "half_res"):
        out = perturb(image, name, seed=0, index=0)
        assert not np.array_equal(out, image)
        assert np.abs(out.astype(int) - image).mean() < 10
        assert float(out.mean()) == pytest.approx(float(image.mean()), abs=1.5)
    flat = np.full((48, 64, 3), 150, dtype=np.uint8)
    assert np.array_equal(perturb(flat, "blur", seed=0, index=0), flat)
    assert np.array_equal(perturb(flat, "half_res", seed=0, index=0), flat)
    noisy = photo()
    assert perturb(noisy, "blur", seed=0, index=0).astype(float).std() < noisy.astype(float).std()


def test_the_painted_vignette_ruler_and_hair() -> None:
    image = photo()
    vignetted = perturb(image, "vignette", seed=0, index=0)
    found = vignette_mask(vignetted)
    assert found[0, 0] and found[0, -1] and found[-1, 0] and found[-1, -1]
    assert np.array_equal(vignetted[96, 128], image[96, 128])  # the middle of the field is untouched
    for index in range(4):
        ruled = perturb(image, "ruler", seed=0, index=index)
        changed = (ruled != image).any(axis=2)
        depth = max(3, round(0.09 * 192))
        bands = [changed[:depth].all(), changed[-depth:].all(), changed[:, :depth].all(), changed[:, -depth:].all()]
        assert sum(bands) == 1 and changed.sum() == depth * (256 if bands[0] or bands[1] else 192)
        stripe = ruled[changed]
        assert (stripe.min(axis=1) > 180).mean() > 0.6 and (stripe.max(axis=1) < 60).any()  # light, dark ticks
    haired = perturb(image, "hair", seed=0, index=0)
    changed = (haired != image).any(axis=2)
    assert 0 < changed.mean() < 0.2
    assert (haired[changed].astype(int).sum(axis=1) < image[changed].astype(int).sum(axis=1)).all()  # darker


def test_bad_arguments_are_one_line_errors() -> None:
    image = photo(32, 32)
    with pytest.raises(BadInputError, match="unknown perturbation 'sepia'"):
        perturb(image, "sepia", seed=0, index=0)
    with pytest.raises(BadInputError, match="--seed"):
        perturb(image, "ink", seed=-1, index=0)
    with pytest.raises(BadInputError, match="lesion mask"):
        perturb(image, "ink", seed=0, index=0, lesion=np.zeros((8, 8), dtype=bool))
    with pytest.raises(BadInputError, match="uint8"):
        perturb(image.astype(np.float32), "ink", seed=0, index=0)
