"""Near-duplicate fingerprints (dermcam.data.fingerprint): copies are found whatever was done to them,
distinct images are not, the block search is the brute-force definition, and the stored array keeps
its shape and dtype. The measured recall and false-pair rates are in benchmarks/bench_duplicates.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermcam.data import fingerprint as fp
from dermcam.errors import BadInputError


def photo(seed: int, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """A dermoscopy-like picture: smooth skin-coloured noise with a dark blob near the centre."""
    rng = np.random.default_rng(seed)
    w, h = size
    grid = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    skin = np.array([225, 180, 155], np.float32) * 0.8 + np.asarray(grid, np.float32) * 0.2
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    rx, ry = w * rng.uniform(0.12, 0.25), h * rng.uniform(0.15, 0.3)
    blob = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))[..., None]
    brown = np.array([90, 50, 30], np.float32) * rng.uniform(0.6, 1.2, 3)
    return Image.fromarray(np.clip(skin * (1 - blob) + brown * blob, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float, left: float, top: float) -> Image.Image:
    """Each side shortened by ``fraction``; ``left``/``top`` in [0, 1] place the cut."""
    cut_w, cut_h = image.width * fraction, image.height * fraction
    x, y = round(cut_w * left), round(cut_h * top)
    return image.crop((x, y, x + round(image.width - cut_w), y + round(image.height - cut_h)))


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(fp.paired_distances(fp.fingerprint(a)[None], fp.fingerprint(b)[None])[0])


TRANSPOSES = list(Image.Transpose)


def test_the_stored_array_keeps_its_shape_and_dtype(tmp_path) -> None:
    """prepare stores fingerprints as one .npy beside the cache: a fixed shape and dtype, no pickle."""
    image = photo(1)
    first = fp.fingerprint(image)
    assert first.shape == (12, 192) == fp.SHAPE and first.dtype == np.float16
    assert fp.fingerprint_entry() == {"file": "fingerprints.npy", "shape": [12, 192], "dtype": "float16", "format": 1}
    assert np.array_equal(first, fp.fingerprint(np.asarray(image)))  # a Pillow image or its pixels: the same
    np.save(tmp_path / fp.FINGERPRINT_FILE, np.stack([first, fp.fingerprint(photo(2))]))
    stored = np.load(tmp_path / fp.FINGERPRINT_FILE, allow_pickle=False)
    assert stored.shape == (2, 12, 192) and stored.dtype == np.float16 and np.array_equal(stored[0], first)


def test_a_re_encoded_resized_and_cropped_copy_is_found_and_a_different_image_is_not() -> None:
    original = photo(3)
    copy = jpeg(crop(original.resize((150, 112), Image.Resampling.BICUBIC), 0.05, 0.3, 0.8), quality=60)
    others = [photo(seed) for seed in range(10, 16)]
    fps = np.stack([fp.fingerprint(im) for im in [original, *others, copy]])
    pairs, distances = fp.near_duplicate_pairs(fps)
    assert pairs.tolist() == [[0, len(fps) - 1]]  # the copy, and nothing else
    assert distances[0] <= fp.DEFAULT_THRESHOLD
    assert distance(original, others[0]) > 3 * fp.DEFAULT_THRESHOLD


@pytest.mark.parametrize("transpose", TRANSPOSES, ids=[t.name for t in TRANSPOSES])
def test_every_flip_and_rotation_of_a_photo_is_found(transpose: Image.Transpose) -> None:
    """Dermoscopy photos of one lesion are routinely flipped and rotated; a 4:3 photo turned by 90
    degrees is 3:4, and still matches."""
    original = photo(4)
    turned = jpeg(original.transpose(transpose), quality=90)
    assert distance(original, turned) <= fp.DEFAULT_THRESHOLD / 2
    assert distance(turned, original) <= fp.DEFAULT_THRESHOLD / 2


@pytest.mark.parametrize("left, top", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (0.3, 0.7)])
def test_a_copy_cropped_by_ten_percent_of_each_side_is_found_wherever_the_cut_falls(left: float, top: float) -> None:
    original = photo(5)
    cropped = jpeg(crop(original, 0.10, left, top), quality=90)
    assert distance(original, cropped) <= fp.DEFAULT_THRESHOLD
    assert distance(cropped.transpose(Image.Transpose.ROTATE_90), original) <= fp.DEFAULT_THRESHOLD


def test_brightness_contrast_and_saturation_changes_do_not_hide_a_copy() -> None:
    from PIL import ImageEnhance

    original = photo(6)
    changed = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(original).enhance(1.1))
                                 .enhance(0.9)).enhance(1.1)
    assert distance(original, jpeg(changed)) <= fp.DEFAULT_THRESHOLD


def test_the_same_layout_in_another_colour_is_not_a_copy() -> None:
    """Correlation ignores each channel's offset and gain, so a blob of the same shape on skin of another
    colour would match; the mean colour is checked apart. A cast no brightness, contrast or saturation
    setting makes (red up, blue down) is not a near duplicate, though the layout alone matches."""
    original = photo(9)
    cast = np.asarray(original).astype(np.int16) + np.array([30, 0, -30], np.int16)
    recoloured = Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8))
    assert distance(original, recoloured) == 2.0
    a, b = fp.fingerprint(original)[None], fp.fingerprint(recoloured)[None]
    assert not fp.colours_match(a[:, fp.COLOUR_ROW], b[:, fp.COLOUR_ROW])[0]
    a[:, fp.COLOUR_ROW], b[:, fp.COLOUR_ROW] = 0, 0  # the colour check off: the layout alone matches
    assert fp.paired_distances(a, b)[0] <= fp.DEFAULT_THRESHOLD


def test_a_greyscale_photo_and_its_copy_match_and_distinct_ones_do_not() -> None:
    """A grey photo has flat chroma channels: they are left out, not turned into amplified noise."""
    grey = photo(7).convert("L").convert("RGB")
    assert distance(grey, jpeg(grey.resize((160, 120)))) <= fp.DEFAULT_THRESHOLD
    assert distance(grey, photo(8).convert("L").convert("RGB")) > fp.DEFAULT_THRESHOLD
    assert np.isfinite(fp.fingerprint(Image.new("RGB", (64, 48), (128, 128, 128))).astype(np.float32)).all()


def small_set(seeds: range) -> list[Image.Image]:
    """Distinct photos, and crops of 8-25% of two of them, turned, so that many pairs are near each other
    and both search stages (whole views; crops in the best orientation) have work."""
    images = [photo(seed) for seed in seeds]
    for k, fraction in enumerate((0.08, 0.12, 0.16, 0.2, 0.25)):
        images.append(jpeg(crop(images[0], fraction, k / 4, 1 - k / 4)).transpose(TRANSPOSES[k % 7]))
        images.append(crop(images[1], fraction, 1 - k / 4, 0.5))
    return images


def test_the_block_search_equals_the_brute_force_definition() -> None:
    fps = np.stack([fp.fingerprint(im) for im in small_set(range(20, 34))])
    full = fp.pair_distances(fps)
    assert np.allclose(full, full.T, atol=1e-5)  # symmetric: a pair's distance does not depend on order
    upper = np.triu(np.ones_like(full, dtype=bool), 1)
    assert (upper & (full < fp.CROP_PREFILTER)).sum() >= 12  # pairs whose crops are compared (stage 2)
    threshold = 0.7  # loose, so many pairs are found, also beyond the crop prefilter
    pairs, distances = fp.near_duplicate_pairs(fps, threshold=threshold, block=7, chunk=5)
    assert len(pairs) > 50
    upper &= full <= threshold
    assert {tuple(p) for p in pairs} == {tuple(p) for p in np.argwhere(upper)}
    assert np.allclose(distances, full[pairs[:, 0], pairs[:, 1]], atol=1e-5)
    # one set against another, blocks not dividing either size
    a, b = fps[:9], fps[9:]
    pairs_ab, distances_ab = fp.near_duplicate_pairs(a, b, threshold=threshold, block=4, chunk=3)
    full_ab = fp.pair_distances(a, b)
    assert {tuple(p) for p in pairs_ab} == {tuple(p) for p in np.argwhere(full_ab <= threshold)}
    assert np.allclose(distances_ab, full_ab[pairs_ab[:, 0], pairs_ab[:, 1]], atol=1e-5)


def test_copies_are_found_across_two_sets_with_their_indices() -> None:
    originals = [photo(seed) for seed in range(50, 58)]
    later = [photo(90), jpeg(originals[5].transpose(Image.Transpose.FLIP_LEFT_RIGHT)), photo(91),
             jpeg(crop(originals[2], 0.1, 0.5, 0.0))]
    pairs, _ = fp.near_duplicate_pairs(np.stack([fp.fingerprint(im) for im in originals]),
                                       np.stack([fp.fingerprint(im) for im in later]))
    assert pairs.tolist() == [[2, 3], [5, 1]]


def test_empty_sets_and_bad_arrays() -> None:
    empty = np.empty((0, *fp.SHAPE), dtype=fp.DTYPE)
    pairs, distances = fp.near_duplicate_pairs(empty)
    assert pairs.shape == (0, 2) and distances.shape == (0,)
    with pytest.raises(BadInputError, match=r"fps_b: expected an array of shape \(n, 12, 192\)"):
        fp.near_duplicate_pairs(empty, np.zeros((3, 64)))
    with pytest.raises(BadInputError, match="uint8 H x W x 3"):
        fp.fingerprint(np.zeros((32, 32), dtype=np.uint8))
    for size in ((1, 1), (40, 10), (7, 300)):  # tiny or thin images are fingerprinted, never refused
        assert np.isfinite(fp.fingerprint(photo(3).resize(size)).astype(np.float32)).all()


def test_mutual_nearest_keeps_copies_and_drops_a_generic_image_near_everything() -> None:
    """Joining every pair within the threshold chains generic photos into one group; a pair is kept for
    grouping only when each image is among the other's MUTUAL_RANK nearest partners."""
    # image 0 is a "hub" near 1-5; 1 and 2 are copies of each other; 3 and 4 each have a closer partner
    pairs = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [1, 2], [3, 6], [4, 7]])
    distances = np.array([0.040, 0.041, 0.042, 0.043, 0.044, 0.010, 0.020, 0.015], dtype=np.float32)
    kept, kept_distances = fp.mutual_nearest(pairs, distances, rank=1)
    assert kept.tolist() == [[1, 2], [3, 6], [4, 7]]
    assert kept_distances.tolist() == pytest.approx([0.010, 0.020, 0.015])
    kept, _ = fp.mutual_nearest(pairs, distances, rank=2)  # 0 is 1's and 2's second nearest; 1, 2 are 0's two
    assert kept.tolist() == [[0, 1], [0, 2], [1, 2], [3, 6], [4, 7]]
    # two sets: column 0 indexes A, column 1 indexes B (index 0 of A is not index 0 of B)
    across = np.array([[0, 0], [0, 1], [1, 0], [2, 1]])
    kept, _ = fp.mutual_nearest(across, np.array([0.01, 0.03, 0.02, 0.02], np.float32), rank=1, same_set=False)
    assert kept.tolist() == [[0, 0], [2, 1]]
    empty, empty_distances = fp.mutual_nearest(np.empty((0, 2), np.int64), np.empty(0, np.float32))
    assert empty.shape == (0, 2) and empty_distances.shape == (0,)
