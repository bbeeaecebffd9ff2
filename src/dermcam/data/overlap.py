"""Overlap between two prepared data sets: images of one that are copies of images of the other.

Why: collections reuse each other's images (ISIC 2019's training set contains HAM10000, ISIC 2020
overlaps earlier years), so a model trained on one and "externally validated" on the other is partly
scored on images it was trained on, and the number says nothing about new patients. The ids cannot
show it (each collection renames its images); the pixels can.

An image of set A *overlaps* set B when some image of B

- has the same bytes (equal sha256 in index.csv): an exact copy, whatever the fingerprints say; or
- is within ``threshold`` of it by the near-duplicate fingerprint (:mod:`dermcam.data.fingerprint`:
  the same photograph re-encoded, resized, cropped by up to 10% a side, flipped, rotated by 90
  degrees or slightly recoloured). Every pair within the threshold counts, without the nearest-partner
  filter of the within-set audit: that filter stops look-alikes from chaining into one split group,
  and nothing chains here, while a copy it dropped would be scored as new.

The fingerprint's limits are the audit's (docs/data.md): near the threshold most pairs of distinct
photos are look-alikes, so at the default threshold 5.7% of ham10000-lite's test images "overlap" its
train split, with which they share no lesion (benchmarks/bench_overlap.py; docs/evaluation.md).
Comparing a set with itself is refused: every image would match itself; ``dermcam data duplicates``
is the within-set audit.

Used by ``dermcam data overlap A B``, by ``dermcam evaluate`` (the evaluated set against the model's
training set: :func:`dermcam.evaluate.evaluation.exclude_overlap`) and after ``prepare --external``
(:func:`store_overlap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.data.fingerprint import near_duplicate_pairs
from dermcam.data.near_duplicates import check_threshold
from dermcam.data.split import SPLITS
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.files import atomic_write_bytes

# Lower than prepare's grouping threshold (fingerprint.DEFAULT_THRESHOLD, 0.055), where joining a
# look-alike only makes the split coarser. Here a match removes an image from an external evaluation, and
# a copy between archives is mostly the same photo re-encoded or resized (ISIC 2019 holds HAM10000 at
# another size), rarely cropped: at 0.04 those are found (recall >= 0.997) and a set without copies loses
# 0.2% of its images to look-alikes, against 5.7% at 0.055 (benchmarks/bench_overlap.py, docs/evaluation.md).
OVERLAP_THRESHOLD = 0.04

if TYPE_CHECKING:
    import pandas as pd

    from dermcam.data.dataset import PreparedDataset

OVERLAP_FILE = "overlap.csv"
# One row per pair: the image of A (the set looked up), then the image of B it matches.
OVERLAP_COLUMNS = ("image_id", "lesion_id", "dx", "split", "matched_set", "matched_image_id", "matched_lesion_id",
                   "matched_dx", "matched_split", "distance", "exact")
# More than this share of the compared images overlapping: a result on them mostly measures the other set.
MOSTLY = 0.5


@dataclass
class Overlap:
    """The images of ``name`` (A) that overlap ``other`` (B): ``pairs`` (OVERLAP_COLUMNS, by image of
    A then closest first; ``distance`` 0 for exact copies) and ``rows``, the row of A (its index.csv
    row, so its cache row) of each pair. ``compared``: the images of A looked up (all, or the rows
    given); ``other_images``: the images of B."""

    name: str
    other: str
    threshold: float
    compared: int
    other_images: int
    pairs: pd.DataFrame
    rows: np.ndarray = field(repr=False)

    @property
    def images(self) -> int:
        """Images of A with at least one match in B."""
        return len(np.unique(self.rows))

    @property
    def exact(self) -> int:
        """Images of A with a byte-identical copy in B."""
        return int(self.pairs.loc[self.pairs["exact"], "image_id"].nunique())

    @property
    def matched(self) -> int:
        """Images of B with at least one match in A."""
        return int(self.pairs["matched_image_id"].nunique())

    @property
    def by_split(self) -> dict[str, int]:
        """Images of A with a match in each split of B (an image matched in two splits counts in both)."""
        return {s: int(self.pairs.loc[self.pairs["matched_split"] == s, "image_id"].nunique()) for s in SPLITS}

    @property
    def mostly(self) -> bool:
        """More than half of the compared images overlap: a result on A mostly measures B's images."""
        return self.compared > 0 and self.images > MOSTLY * self.compared

    def overlapping_rows(self) -> np.ndarray:
        """The rows of A that overlap B, sorted, each once."""
        return np.unique(self.rows)

    def counts(self) -> dict[str, Any]:
        """The numbers without the pairs (what prepare's summary and evaluate's JSON keep)."""
        return {"name": self.name, "other": self.other, "threshold": self.threshold, "compared": self.compared,
                "other_images": self.other_images, "images": self.images, "exact": self.exact,
                "matched": self.matched, "by_split": self.by_split, "mostly": self.mostly}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`counts` and every pair (``dermcam data overlap --json``)."""
        return {**self.counts(), "pairs": pair_records(self.pairs)}


def pair_records(pairs: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of an overlap frame as JSON-ready dicts (numpy scalars made plain)."""
    return [{**row, "distance": float(row["distance"]), "exact": bool(row["exact"])}
            for row in pairs.to_dict(orient="records")]


def check_overlap_threshold(value: object, option: str = "--threshold") -> float:
    """An overlap threshold as a float from 0 (byte-identical copies only) to 0.2, else one-line BadInputError."""
    return check_threshold(value, option, zero="byte-identical copies only")


def _check_not_same(a: PreparedDataset, b: PreparedDataset) -> None:
    if Path(a.path).resolve() == Path(b.path).resolve():
        raise BadInputError(f"data set '{a.name}' compared with itself: every image would match; its "
                            f"near-duplicates are listed by: dermcam data duplicates {a.name}")


def _exact_pairs(a: pd.DataFrame, b: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """(m, 2) pairs (row of A, row of B) with the same non-empty sha256 (sets prepared before the
    column existed have none: no exact pairs, the fingerprints still compare them)."""
    if "sha256" not in a.columns or "sha256" not in b.columns:
        return np.empty((0, 2), dtype=np.int64)
    in_b: dict[str, list[int]] = {}
    for j, digest in enumerate(b["sha256"].tolist()):
        if digest:
            in_b.setdefault(digest, []).append(j)
    digests = a["sha256"].to_numpy(dtype=object)[rows]
    found = [(int(i), j) for i, digest in zip(rows, digests) if digest for j in in_b.get(digest, ())]
    return np.array(found, dtype=np.int64).reshape(-1, 2)


def find_overlap(a: PreparedDataset, b: PreparedDataset, threshold: float = OVERLAP_THRESHOLD, *,
                 rows: np.ndarray | None = None) -> Overlap:
    """The images of ``a`` (or of its ``rows``: evaluate passes the split it scores) that overlap ``b``:
    byte-identical copies, and images whose fingerprints are within ``threshold`` (0: byte-identical
    copies only, and then the fingerprints are not needed).

    Raises BadInputError for ``a`` compared with itself or a threshold outside 0..0.2, and what
    :meth:`~dermcam.data.dataset.PreparedDataset.fingerprints` raises for a set prepared before
    fingerprints existed (NotFoundError) or a damaged file (CorruptError), one line naming the
    ``dermcam prepare`` command that fixes it. The search compares every pair: 1.7 s for 1,137 images
    against 5,291 on the 2-core machine (benchmarks/bench_overlap.py).
    """
    import pandas as pd

    threshold = check_overlap_threshold(threshold, "the overlap threshold")
    _check_not_same(a, b)
    rows_a = np.arange(len(a.index), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    if len(rows_a) and (rows_a.min() < 0 or rows_a.max() >= len(a.index)):
        raise BadInputError(f"rows of data set '{a.name}' out of range 0..{len(a.index) - 1}")
    found: dict[tuple[int, int], tuple[float, bool]] = {}
    if threshold > 0 and len(rows_a) and len(b.index):
        fps_a, fps_b = a.fingerprints(), b.fingerprints()  # both checked before the search
        near, distances = near_duplicate_pairs(fps_a[rows_a], fps_b, threshold)
        for (i, j), d in zip(near.tolist(), distances.tolist()):
            found[(int(rows_a[i]), j)] = (round(float(d), 4), False)
    for i, j in _exact_pairs(a.index, b.index, rows_a).tolist():
        found[(i, j)] = (0.0, True)
    keys = sorted(found)
    ia = np.array([k[0] for k in keys], dtype=np.int64)
    ib = np.array([k[1] for k in keys], dtype=np.int64)

    def column(table: pd.DataFrame, name: str, at: np.ndarray) -> np.ndarray:
        return table[name].to_numpy(dtype=object)[at] if name in table.columns else np.full(len(at), "", dtype=object)

    frame = pd.DataFrame({
        **{c: column(a.index, c, ia) for c in ("image_id", "lesion_id", "dx", "split")},
        "matched_set": [b.name] * len(keys),
        **{f"matched_{c}": column(b.index, c, ib) for c in ("image_id", "lesion_id", "dx", "split")},
        "distance": np.array([found[k][0] for k in keys], dtype=np.float64),
        "exact": np.array([found[k][1] for k in keys], dtype=bool)}, columns=list(OVERLAP_COLUMNS))
    frame["_row"] = ia
    frame = frame.sort_values(["image_id", "distance", "matched_image_id"], kind="stable").reset_index(drop=True)
    order = frame.pop("_row").to_numpy(dtype=np.int64)
    return Overlap(a.name, b.name, threshold, len(rows_a), len(b.index), frame, order)


def merged(overlaps: Sequence[Overlap]) -> Overlap:
    """Several overlaps of one set A (against several sets, e.g. an ensemble's training sets) as one:
    its counts are over the union of the pairs (``matched_set`` tells them apart)."""
    import pandas as pd

    if not overlaps:
        raise BadInputError("no overlap to merge")
    first = overlaps[0]
    if len(overlaps) == 1:
        return first
    frame = pd.concat([o.pairs for o in overlaps], ignore_index=True)
    return Overlap(first.name, "+".join(o.other for o in overlaps), first.threshold, first.compared,
                   sum(o.other_images for o in overlaps), frame, np.concatenate([o.rows for o in overlaps]))


def write_overlap(path: Path, overlaps: Sequence[Overlap]) -> Path:
    """``overlap.csv``: the pairs of every overlap (one set against one or several others), written
    atomically; a header alone when none was found (the check ran and found nothing)."""
    import pandas as pd

    frames = [o.pairs for o in overlaps if len(o.pairs)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(OVERLAP_COLUMNS))
    atomic_write_bytes(Path(path), frame.to_csv(index=False, lineterminator="\n").encode())
    return Path(path)


@dataclass
class StoreOverlap:
    """An external set against every other non-external set of its store: ``overlaps`` (one per set
    compared, overlapping or not) and ``unchecked`` (set name -> why it could not be compared)."""

    name: str
    threshold: float
    overlaps: list[Overlap] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "compared": [o.other for o in self.overlaps],
                "overlaps": [o.counts() for o in self.overlaps if o.images], "unchecked": self.unchecked}


def store_overlap(name: str, threshold: float = OVERLAP_THRESHOLD, root: Path | None = None) -> StoreOverlap:
    """After ``prepare --external``: the prepared set ``name`` against every other set of the store that
    was not prepared with ``--external`` (the sets a model may have been trained on). A set that cannot
    be compared (prepared before fingerprints existed, damaged) is named in ``unchecked`` with the
    command that fixes it, not raised: the external set itself was prepared fine."""
    from dermcam.data.dataset import list_prepared, load_prepared

    dataset = load_prepared(name, root)
    dataset.fingerprints()  # this set's own problem is an error, not a note on every other set
    result = StoreOverlap(dataset.name, threshold)
    for manifest in list_prepared(root):
        if manifest.get("name") == dataset.name or manifest.get("external") is True:
            continue
        try:
            result.overlaps.append(find_overlap(dataset, load_prepared(str(manifest["name"]), root), threshold))
        except (NotFoundError, CorruptError) as exc:
            result.unchecked[str(manifest["name"])] = str(exc)
    return result
