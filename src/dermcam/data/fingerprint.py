"""Near-duplicate fingerprints: the same photograph found again after re-encoding, resizing, cropping,
flipping, rotating or a slight colour change, so a leakage audit can group copies it cannot see in the
metadata (HAM10000 holds images of one lesion under different lesion ids; ISIC reuses images).

What a fingerprint is (``benchmarks/bench_duplicates.py`` measured every choice against imagehash's
pHash and CNN embeddings: docs/benchmarks.md). Per view of the image, a 16x16 thumbnail in an opponent
colour space (luminance, red-green, yellow-blue), each channel's 8x8 lowest-frequency DCT coefficients
without the DC term, scaled to unit length, so that the dot product of two views is the mean over the
three channels of the correlation of their low-passed thumbnails. Why this and not a published hash:

- It degrades smoothly when the content moves. pHash binarises DCT coefficients at their median, so a
  1% shift flips 36 of its 256 bits (2 unrelated images differ by 128, reached at a 3.5% shift): no
  threshold both finds 10%-crops and keeps false pairs under 1 in 10,000.
- Correlation ignores each channel's offset and gain: brightness, contrast and saturation changes do
  not move it, and the colour channels keep apart many photos that in luminance are the same dark blob
  centred on skin (a 64-bit hash matched 1 pair in 2,000 of distinct HAM10000 lesions).
- Because it ignores them, the mean colour is checked apart (:func:`colours_match`): two images whose
  chroma/luminance vectors differ by more than any of those changes makes are not near duplicates. The
  same blob on skin of another colour was the commonest false pair.
- A view is the whole image squashed to a square: that commutes with flips and 90-degree rotations,
  even of a 4:3 photo (the cover-cropped cache row does not: the cache keeps a different part of a
  rotated photo, and matched no 90-degree rotation), and each of the 8 flips/rotations of a view is a
  signed permutation of its DCT coefficients, so one stored view gives all eight at search time.
- A crop changes the frame, so each fingerprint also holds 10 crops of the image (the centred 95%, and
  90% at 3x3 offsets), compared with the other image's whole view: a copy cut by up to 10% on each side,
  anywhere, is within 2.5% of one of them.

A fingerprint is one ``(12, 192)`` float16 array (4.6 KB, 3% of a 256x192 cache row): row 0 the whole
image, rows 1-10 the crops, row 11 the whole image's mean colour. Compute it from the decoded, upright
image before :func:`~dermcam.data.geometry.cover_resize`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    from PIL import Image

FINGERPRINT_FILE = "fingerprints.npy"
FORMAT_VERSION = 1  # bump when anything below changes what a fingerprint holds
SIDE = 16  # thumbnail side (pixels)
COEFFS = 8  # k x k lowest DCT frequencies kept per channel
# (left, top, size) of each crop as fractions of the image's width and height: the centred 95%, then
# 90% at offsets 0/5/10% in x and y. A crop of 90-100% of each side, anywhere, is within 2.5% of one.
CROPS: tuple[tuple[float, float, float], ...] = ((0.025, 0.025, 0.95),) + tuple(
    (x, y, 0.90) for y in (0.0, 0.05, 0.10) for x in (0.0, 0.05, 0.10))
DIM = 3 * COEFFS * COEFFS
CROP_ROWS = slice(1, 1 + len(CROPS))
COLOUR_ROW = 1 + len(CROPS)  # the whole image's mean luminance, red-green and yellow-blue in its first 3 entries
SHAPE = (2 + len(CROPS), DIM)
DTYPE = np.float16
# Distance = 1 - similarity (similarity: the mean channel correlation, best orientation, best crop).
# Chosen on the benchmark (docs/benchmarks.md): both goals, recall >= 0.95 on every planted kind and at
# most 1 false pair per 10,000 pairs of distinct HAM10000-lite lesions, hold from 0.05 to 0.06; 0.055,
# the middle, keeps a margin on each side (worst-kind recall 0.978, 0.51 false pairs per 10,000).
DEFAULT_THRESHOLD = 0.055
# Crops are compared only for pairs whose whole views are this close (the search's second stage): 99.7%
# of 10%-crops pass, and it leaves about 1 pair in 8 of distinct lesions to the crop comparison.
CROP_PREFILTER = 0.30
# Pairs kept for grouping: each image among the other's 2 nearest partners (:func:`mutual_nearest`).
MUTUAL_RANK = 2
# Mean colours may differ by what a brightness, contrast or saturation change does to them: those scale
# the chroma/luminance vector (red-green, yellow-blue over luminance) by contrast x saturation, so its
# length may change by a factor e^0.3 (1.35: 10% on each, plus JPEG and crops) and its direction (hue)
# by 0.2 rad (11 degrees; hue is in theory unchanged). Below 0.02 (a grey photo: skin is ~0.18) hue is
# not compared. Measured: this cuts false pairs 4-fold and loses under 1% of the planted copies.
CHROMA_TOLERANCE = 0.3
HUE_TOLERANCE = 0.2
_GREY = 0.02
# A channel whose low frequencies carry less energy than this (grey levels, over the thumbnail) is flat:
# it is left out rather than its noise scaled up to unit length (the chroma of a greyscale photo).
_FLAT = 1.0
# RGB -> luminance, red-green, yellow-blue (rows).
_OPPONENT = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]], dtype=np.float32)


def fingerprint_entry() -> dict[str, Any]:
    """The manifest entry describing a fingerprint file written by this version (to detect a stale one)."""
    return {"file": FINGERPRINT_FILE, "shape": list(SHAPE), "dtype": np.dtype(DTYPE).name, "format": FORMAT_VERSION}


def _views(image: Image.Image) -> np.ndarray:
    """(1 + len(CROPS), SIDE, SIDE, 3) float32 opponent-colour thumbnails: the whole image, then each crop."""
    from PIL import Image

    width, height = image.size
    factor = min(width, height) // (4 * SIDE)  # integer box reduction first: fast, and exact area averaging
    small = image.reduce(factor) if factor >= 2 else image
    sx, sy = small.width / width, small.height / height
    boxes = [(0.0, 0.0, 1.0, 1.0)] + [(x, y, x + s, y + s) for x, y, s in CROPS]
    thumbs = [np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BILINEAR, reducing_gap=None,
                                      box=(left * width * sx, top * height * sy, min(right * width * sx, small.width),
                                           min(bottom * height * sy, small.height))), dtype=np.float32)
              for left, top, right, bottom in boxes]
    return np.stack(thumbs) @ _OPPONENT.T


def _colour(whole: np.ndarray) -> np.ndarray:
    """The COLOUR_ROW of a whole (SIDE, SIDE, 3) opponent-colour thumbnail: its mean per channel."""
    row = np.zeros(DIM, dtype=np.float32)
    row[:3] = whole.mean(axis=(0, 1))
    return row


def _dct_matrix() -> np.ndarray:
    """The first COEFFS rows of the orthonormal DCT-II matrix of size SIDE (scipy's ``dct(norm="ortho")``)."""
    k, n = np.arange(COEFFS)[:, None], np.arange(SIDE)[None, :]
    matrix = np.sqrt(2.0 / SIDE) * np.cos(np.pi * (2 * n + 1) * k / (2 * SIDE))
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


_DCT = _dct_matrix()


def _coefficients(views: np.ndarray) -> np.ndarray:
    """(n, SIDE, SIDE, 3) thumbnails -> (n, DIM) unit rows: per channel the COEFFS x COEFFS lowest DCT
    frequencies, DC dropped, each non-flat channel scaled to 1/sqrt(active channels)."""
    coeffs = _DCT @ views.transpose(0, 3, 1, 2) @ _DCT.T  # (n, channel, vertical k, horizontal l)
    coeffs[:, :, 0, 0] = 0.0
    energy = np.linalg.norm(coeffs, axis=(2, 3), keepdims=True)
    active = energy > _FLAT
    scale = np.where(active, 1.0 / np.maximum(energy, _FLAT), 0.0)
    scale /= np.sqrt(np.maximum(active.sum(axis=1, keepdims=True), 1))
    return (coeffs * scale).reshape(len(views), DIM)


def fingerprint(image: Image.Image | np.ndarray) -> np.ndarray:
    """The ``SHAPE`` ``DTYPE`` fingerprint of one upright RGB image (a Pillow image or uint8 H x W x 3).

    Give it the decoded image before the cache's cover crop (see the module docstring). Any size works
    (a tiny image is enlarged, so prepare never fails on one), and large images are box-reduced first,
    so a 6000x4000 photo costs about what a 600x450 one does. Only a malformed array raises.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BadInputError(f"fingerprint needs a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    views = _views(image)
    return np.vstack([_coefficients(views), _colour(views[0])]).astype(DTYPE)


def _dihedral() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8 flips/rotations of a view as signed permutations of its DCT coefficients.

    Mirroring a DCT-II input multiplies frequency k by (-1)^k; transposing the image transposes the
    coefficients. Returns ``perm``, ``sign`` (8, DIM) with ``variant_v(x) = x[perm[v]] * sign[v]``
    (variant 0 the identity) and ``inverse`` (8,), the index of each variant's inverse.
    """
    index = np.arange(1, DIM + 1, dtype=np.float64).reshape(3, COEFFS, COEFFS)
    alt = (-1.0) ** np.arange(COEFFS)
    variants = []
    for transpose in (False, True):
        base = index.transpose(0, 2, 1) if transpose else index
        for rows in (1.0, -1.0):
            for cols in (1.0, -1.0):
                variants.append(base * np.where(rows < 0, alt, 1.0)[:, None] * np.where(cols < 0, alt, 1.0)[None, :])
    signed = np.stack([v.ravel() for v in variants])
    perm, sign = (np.abs(signed) - 1).astype(np.intp), np.sign(signed).astype(np.float32)
    inverse = np.empty(8, dtype=np.intp)
    for v in range(8):  # the u with variant_u(variant_v(x)) == x
        composed = signed[v][perm[np.arange(8)]] * sign  # variant_u applied to variant_v's output
        inverse[v] = int(np.flatnonzero((composed == np.arange(1, DIM + 1)).all(axis=1))[0])
    return perm, sign, inverse


_PERM, _SIGN, _INVERSE = _dihedral()


def dihedral_variants(rows: np.ndarray) -> np.ndarray:
    """(n, DIM) whole-image rows -> (n, 8, DIM): the rows of the image's 8 flips and rotations."""
    return np.ascontiguousarray(rows[:, _PERM]) * _SIGN  # (advanced indexing returns it strided)


def check_fingerprints(fps: np.ndarray, name: str = "fingerprints") -> np.ndarray:
    """``fps`` as an (n, *SHAPE) array, or a one-line BadInputError (another version's file, a typo)."""
    fps = np.asarray(fps)
    if fps.ndim != 3 or fps.shape[1:] != SHAPE or not np.issubdtype(fps.dtype, np.floating):
        raise BadInputError(f"{name}: expected an array of shape (n, {SHAPE[0]}, {SHAPE[1]}) of floats, "
                            f"got {fps.dtype} {fps.shape}")
    return fps


def _row_blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _best_crop(crops: np.ndarray, owner: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each pair p, max over k of <crops[owner[p], k], others[p]>: one small matrix product per owner
    (gathering each pair's 10 crops instead moves 8 KB per pair and was 10x slower)."""
    order = np.argsort(owner, kind="stable")
    owners, starts = np.unique(owner[order], return_index=True)
    if len(owners) * 4 > len(owner):  # few pairs per owner (paired distances): gathering is cheaper
        return np.einsum("nkd,nd->nk", crops[owner], others).max(axis=1)
    ends = np.append(starts[1:], len(order))
    out = np.empty(len(owner), dtype=np.float32)
    for o, start, end in zip(owners, starts, ends):
        pairs = order[start:end]
        out[pairs] = (others[pairs] @ crops[o].T).max(axis=1)
    return out


def _crop_similarity(a: np.ndarray, a_variants: np.ndarray, b: np.ndarray, b_variants: np.ndarray,
                     ia: np.ndarray, ib: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The best crop similarity of pairs (ia, ib) whose whole views align under variant ``best`` (a -> b):
    a's crops against b's whole view brought into a's frame (the inverse variant), and b's crops against
    a's whole view in b's frame. ``a``, ``b`` float32 fingerprints, ``*_variants`` their whole views'."""
    b_in_a = np.take(b_variants.reshape(-1, DIM), ib * 8 + _INVERSE[best], axis=0)
    a_in_b = np.take(a_variants.reshape(-1, DIM), ia * 8 + best, axis=0)
    return np.maximum(_best_crop(a[:, CROP_ROWS], ia, b_in_a), _best_crop(b[:, CROP_ROWS], ib, a_in_b))


def colours_match(colour_a: np.ndarray, colour_b: np.ndarray) -> np.ndarray:
    """Whether pairs of COLOUR_ROW rows (n, >= 3) differ by no more than brightness, contrast and
    saturation changes explain (:data:`CHROMA_TOLERANCE`, :data:`HUE_TOLERANCE`). All-zero rows
    match each other (a caller can switch the check off that way)."""
    chroma_a = colour_a[:, 1:3] / np.maximum(colour_a[:, :1], 1.0)
    chroma_b = colour_b[:, 1:3] / np.maximum(colour_b[:, :1], 1.0)
    size_a, size_b = np.linalg.norm(chroma_a, axis=1), np.linalg.norm(chroma_b, axis=1)
    size_ok = np.abs(np.log((size_a + 0.01) / (size_b + 0.01))) <= CHROMA_TOLERANCE
    cosine = (chroma_a * chroma_b).sum(axis=1) / np.maximum(size_a * size_b, 1e-12)
    hue_ok = (np.minimum(size_a, size_b) < _GREY) | (np.arccos(np.clip(cosine, -1.0, 1.0)) <= HUE_TOLERANCE)
    return size_ok & hue_ok


def _distance(whole: np.ndarray, crop: np.ndarray, colour_ok: np.ndarray) -> np.ndarray:
    """1 - the best similarity (the whole views', or the crops' where the whole views pass the
    prefilter), or 2, the maximum, where the colours do not match."""
    similarity = np.where(whole >= 1.0 - CROP_PREFILTER, np.maximum(whole, crop), whole)
    return np.where(colour_ok, np.clip(1.0 - similarity, 0.0, 2.0), 2.0).astype(np.float32)


def _unpacked(fps: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """Rows of stored (float16) fingerprints as float32, and their whole views' 8 variants."""
    block = fps[rows].astype(np.float32)
    return block, dihedral_variants(block[:, 0])


def near_duplicate_pairs(fps_a: np.ndarray, fps_b: np.ndarray | None = None, threshold: float = DEFAULT_THRESHOLD,
                         *, block: int = 1024, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of images whose fingerprints are within ``threshold``: ``(pairs, distances)``.

    ``pairs`` is (m, 2) int64, row indices into ``fps_a`` and ``fps_b`` (or, with ``fps_b`` None, pairs
    i < j within ``fps_a``), sorted; ``distances`` (m,) float32 is 1 - similarity, in [0, 2] (2 for pairs
    whose colours do not match: :func:`colours_match`).

    Two stages, so the search costs little more than one matrix product: (1) every pair's whole views,
    in all 8 orientations, as ``block`` x ``block`` matrix products; (2) for the pairs whose whole views
    are within :data:`CROP_PREFILTER`, the crops, in the orientation stage 1 found best, ``chunk`` pairs
    at a time. Memory stays near 100 * block^2 bytes (100 MB at the default) besides the inputs,
    whatever the sizes of the sets: 7,567 x 7,567 images took a 244 MB process. The result is :func:`pair_distances` thresholded.
    """
    a = check_fingerprints(fps_a, "fps_a")
    b = a if fps_b is None else check_fingerprints(fps_b, "fps_b")
    same = fps_b is None
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for rows in _row_blocks(len(a), block):
        ra, ra_variants = _unpacked(a, rows)
        for cols in _row_blocks(len(b), block):
            if same and cols.stop <= rows.start + 1:
                continue
            rb, rb_variants = (ra, ra_variants) if same and cols == rows else _unpacked(b, cols)
            sims = (ra_variants.reshape(-1, DIM) @ rb[:, 0].T).reshape(len(ra), 8, len(rb))
            whole = sims.max(axis=1)
            keep = whole >= 1.0 - max(CROP_PREFILTER, threshold)
            if same:
                keep &= np.arange(rows.start, rows.stop)[:, None] < np.arange(cols.start, cols.stop)[None, :]
            li, lj = np.nonzero(keep)
            for part in _row_blocks(len(li), chunk):
                pi, pj = li[part], lj[part]
                best = sims[pi, :, pj].argmax(axis=1)
                crop = _crop_similarity(ra, ra_variants, rb, rb_variants, pi, pj, best)
                distance = _distance(whole[pi, pj], crop, np.ones(len(pi), dtype=bool))
                hit = np.flatnonzero(distance <= threshold)  # the colour check on these alone: cheaper
                hit = hit[colours_match(ra[pi[hit], COLOUR_ROW, :3], rb[pj[hit], COLOUR_ROW, :3])]
                found.append((pi[hit] + rows.start, pj[hit] + cols.start, distance[hit]))
    if not found:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32)
    i, j, d = (np.concatenate(parts) for parts in zip(*found))
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], axis=1).astype(np.int64), d[order]


def mutual_nearest(pairs: np.ndarray, distances: np.ndarray, rank: int = MUTUAL_RANK, *,
                   same_set: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (from :func:`near_duplicate_pairs`) in which each image is among the other's ``rank``
    nearest partners; ties go to the lower index.

    Why: generic photos (a round brown blob centred on pink skin) are within the threshold of many
    others, and joining every pair chains them: on HAM10000-lite at 0.055, 1,460 false pairs join 1,024
    images into one group. A copy is its original's nearest or second-nearest partner, so ``rank`` 2
    keeps 99.6% of the planted copies and leaves a largest group of 37 (bench_duplicates.py).
    ``same_set``: pairs within one set (i < j, an image's partners are in both columns); False for
    pairs of set A against set B (column 0 indexes A, column 1 indexes B).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    distances = np.asarray(distances, dtype=np.float32)
    if len(pairs) == 0:
        return pairs, distances
    first, second = pairs[:, 0], pairs[:, 1] if same_set else pairs[:, 1] + int(pairs[:, 0].max()) + 1
    owner = np.concatenate([first, second])
    partner = np.concatenate([second, first])
    order = np.lexsort((partner, np.concatenate([distances, distances]), owner))
    starts = np.searchsorted(owner[order], owner[order], side="left")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - starts + 1
    keep = (ranks[:len(pairs)] <= rank) & (ranks[len(pairs):] <= rank)
    return pairs[keep], distances[keep]


def paired_distances(fps_a: np.ndarray, fps_b: np.ndarray) -> np.ndarray:
    """(n,) float32 distances of a[i] to b[i]: how far each image is from its supposed copy."""
    a = check_fingerprints(fps_a, "fps_a")
    b = check_fingerprints(fps_b, "fps_b")
    if len(a) != len(b):
        raise BadInputError(f"paired_distances needs as many fingerprints on each side, got {len(a)} and {len(b)}")
    a32, a_variants = _unpacked(a, slice(None))
    b32, b_variants = _unpacked(b, slice(None))
    sims = np.einsum("nvd,nd->nv", a_variants, b32[:, 0])
    best = sims.argmax(axis=1)
    index = np.arange(len(a))
    crop = _crop_similarity(a32, a_variants, b32, b_variants, index, index, best)
    return _distance(sims[index, best], crop, colours_match(a32[:, COLOUR_ROW, :3], b32[:, COLOUR_ROW, :3]))


def pair_distances(fps_a: np.ndarray, fps_b: np.ndarray | None = None) -> np.ndarray:
    """The full (len(a), len(b)) distance matrix, one row at a time: the definition that
    :func:`near_duplicate_pairs` computes in blocks and prunes. For small sets and tests."""
    a = check_fingerprints(fps_a, "fps_a")
    b = a if fps_b is None else check_fingerprints(fps_b, "fps_b")
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for i in range(len(a)):
        out[i] = paired_distances(np.repeat(a[i:i + 1], len(b), axis=0), b)
    return out
