"""The near-duplicate audit of a data set: photographs found twice although their ids differ.

``prepare`` fingerprints every kept image (:mod:`dermcam.data.fingerprint`), joins pairs closer than a
threshold into one split group (:func:`dermcam.data.split.group_keys`), and writes what it found:
``duplicates.csv`` (one row per pair) and the manifest's ``near_duplicates`` counts. A *cluster* is a
connected set of pairs; it *crosses lesion ids* when its images were in different groups by their ids
alone (different lesion ids, HAM10000's missed duplicates; or different patients, or images without
ids), and it is a *label conflict* when its images carry different labels. ``dermcam data duplicates``
reads the pairs back (:func:`duplicate_clusters`); clusters are computed the same way on both sides.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.data.fingerprint import DEFAULT_THRESHOLD, mutual_nearest, near_duplicate_pairs
from dermcam.data.split import components, group_keys
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.files import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

    from dermcam.data.dataset import PreparedDataset

DUPLICATES_FILE = "duplicates.csv"
DUPLICATE_COLUMNS = ("cluster", "image_id_a", "image_id_b", "distance", "lesion_id_a", "lesion_id_b", "dx_a", "dx_b")
# Above this distance, distinct lesions pair by the hundred (docs/data.md): a larger threshold would
# merge most of a data set into one group, which is a typo rather than an audit.
MAX_THRESHOLD = 0.2


def check_threshold(value: object, option: str = "--duplicate-threshold", zero: str = "off") -> float:
    """``value`` as a float in [0, MAX_THRESHOLD] (0: no grouping by near-duplicates; ``zero`` says
    what 0 means to the caller, e.g. overlap's byte-identical copies only), else BadInputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= MAX_THRESHOLD:
        raise BadInputError(f"{option} must be a number from 0 ({zero}) to {MAX_THRESHOLD} "
                            f"(default {DEFAULT_THRESHOLD}), not {value!r}")
    return float(value) + 0.0  # -0.0 -> 0.0


def find_pairs(fingerprints: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The pairs (m, 2) of rows to group, their distances, and how many pairs were within ``threshold``.

    Grouped: the pairs within ``threshold`` in which each image is among the other's nearest partners
    (:func:`~dermcam.data.fingerprint.mutual_nearest`). Joining every pair within the threshold chains
    generic-looking photos into one group of hundreds of lesions of every class (on HAM10000-lite, 450
    images of 387 lesions at 0.05, 1,024 images at 0.055), which the split must put on one side whole. None at ``threshold`` 0.
    """
    if threshold <= 0 or len(fingerprints) < 2:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32), 0
    pairs, distances = near_duplicate_pairs(fingerprints, threshold=threshold)
    kept, kept_distances = mutual_nearest(pairs, distances)
    return kept, kept_distances, len(pairs)


@dataclass
class Audit:
    """The near-duplicates of one set: ``pairs`` (the rows of duplicates.csv), ``clusters`` (cross-lesion
    first, then closest first) and ``summary`` (the manifest's ``near_duplicates``)."""

    pairs: pd.DataFrame
    clusters: list[dict[str, Any]]
    summary: dict[str, Any]


def audit(index: pd.DataFrame, pairs: np.ndarray, distances: np.ndarray, threshold: float,
          within_threshold: int | None = None) -> Audit:
    """The clusters and counts of ``pairs`` (row positions in ``index``, whose ``split`` and ``group``
    are the final ones) with their ``distances``; prepare and ``data duplicates`` both call it.
    ``within_threshold``: how many pairs were within the threshold before the nearest-partner filter
    (prepare knows it; ``data duplicates`` reads it from the manifest)."""
    import pandas as pd

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    by_ids = group_keys(index).to_numpy(dtype=object)  # the groups the ids alone make
    component = components(len(index), pairs)
    ids, lesions, labels = (index[c].to_numpy(dtype=object) for c in ("image_id", "lesion_id", "dx"))
    splits, groups = index["split"].to_numpy(dtype=object), index["group"].to_numpy(dtype=object)
    edges: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(pairs.tolist()):
        edges.setdefault(int(component[i]), []).append(k)
    clusters = []
    for root, members in edges.items():
        rows = sorted({int(r) for k in members for r in pairs[k]})
        clusters.append({
            "size": len(rows),
            "images": [{"image_id": ids[r], "lesion_id": lesions[r], "dx": labels[r], "split": splits[r]}
                       for r in rows],
            "lesion_ids": sorted({lesions[r] for r in rows if lesions[r]}),
            "labels": sorted({labels[r] for r in rows}),
            "split": "/".join(sorted({splits[r] for r in rows})),
            "group": groups[root],
            "max_distance": round(float(distances[members].max()), 4),
            "cross_lesion": len({by_ids[r] for r in rows}) > 1,
            "conflict": len({labels[r] for r in rows}) > 1,
            "pairs": [[ids[pairs[k][0]], ids[pairs[k][1]], round(float(distances[k]), 4)] for k in members],
            "_root": root,
        })
    # closest first: on real data the pairs near the threshold are mostly look-alikes (docs/data.md)
    clusters.sort(key=lambda c: (not c["cross_lesion"], c["max_distance"], -c["size"], c["images"][0]["image_id"]))
    number = {c["_root"]: n for n, c in enumerate(clusters, start=1)}
    clusters = [{"cluster": number[c["_root"]], **{k: v for k, v in c.items() if k != "_root"}} for c in clusters]
    frame = pd.DataFrame({
        "cluster": [number[int(component[i])] for i in pairs[:, 0].tolist()],
        "image_id_a": ids[pairs[:, 0]], "image_id_b": ids[pairs[:, 1]], "distance": np.round(distances, 4),
        "lesion_id_a": lesions[pairs[:, 0]], "lesion_id_b": lesions[pairs[:, 1]],
        "dx_a": labels[pairs[:, 0]], "dx_b": labels[pairs[:, 1]]}, columns=list(DUPLICATE_COLUMNS))
    frame = frame.sort_values(["cluster", "distance", "image_id_a", "image_id_b"], kind="stable")
    cross = by_ids[pairs[:, 0]] != by_ids[pairs[:, 1]] if len(pairs) else np.zeros(0, dtype=bool)
    summary = {
        "threshold": threshold, "file": DUPLICATES_FILE,
        "within_threshold": len(pairs) if within_threshold is None else within_threshold, "pairs": len(pairs),
        "images": len(set(pairs.ravel().tolist())), "clusters": len(clusters),
        "cross_lesion_pairs": int(cross.sum()),
        "cross_lesion_clusters": sum(c["cross_lesion"] for c in clusters),
        "label_conflicts": sum(c["conflict"] for c in clusters),
        "groups_merged": int(pd.Series(by_ids).nunique() - index["group"].nunique()),
    }
    return Audit(frame.reset_index(drop=True), clusters, summary)


def write_pairs(folder: Path, result: Audit) -> None:
    """``duplicates.csv`` in the set's (build) folder, written atomically."""
    atomic_write_bytes(folder / DUPLICATES_FILE, result.pairs.to_csv(index=False, lineterminator="\n").encode())


def _read_pairs(dataset: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """duplicates.csv of ``dataset`` as row positions and distances, checked against its index
    (CorruptError when it is not a CSV of known image ids and distances in [0, 2])."""
    import pandas as pd

    path = dataset.path / DUPLICATES_FILE
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        distances = frame["distance"].astype(np.float64).to_numpy()
        row_of = {image_id: i for i, image_id in enumerate(dataset.index["image_id"])}
        pairs = np.array([[row_of[a], row_of[b]] for a, b in zip(frame["image_id_a"], frame["image_id_b"])],
                         dtype=np.int64).reshape(-1, 2)
    except FileNotFoundError:
        raise NotFoundError(f"data set '{dataset.name}' has no {DUPLICATES_FILE}; "
                            f"run: {dataset.prepare_command()}") from None
    except (OSError, ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        reason = f"unknown image id {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        raise CorruptError(f"{path} is damaged ({reason}); run: {dataset.prepare_command()}") from None
    if not np.isfinite(distances).all() or (distances < 0).any() or (distances > 2).any() \
            or (pairs[:, 0] == pairs[:, 1]).any():
        raise CorruptError(f"{path} is damaged (a distance outside 0..2, or an image paired with itself); "
                           f"run: {dataset.prepare_command()}")
    return pairs, distances


def duplicate_clusters(dataset: PreparedDataset, include_same_lesion: bool = False) -> dict[str, Any]:
    """``dermcam data duplicates``: the set's near-duplicate clusters, cross-lesion ones first, closest first.

    Returns ``name``, ``summary`` (the counts) and ``clusters`` (each: ``cluster`` number, ``size``,
    ``images`` with their lesion id, label and split, ``lesion_ids``, ``labels``, ``split``, ``group``,
    ``max_distance``, ``cross_lesion``, ``conflict``, ``pairs``). Same-lesion clusters (several photos
    of one lesion, expected) only with ``include_same_lesion``. A set prepared before the audit
    existed raises NotFoundError naming the command that adds it; a damaged duplicates.csv CorruptError.
    """
    recorded = dataset.manifest.get("near_duplicates")
    if not isinstance(recorded, dict):
        raise NotFoundError(f"data set '{dataset.name}' was prepared before near-duplicates were searched; "
                            f"run: {dataset.prepare_command()}")
    threshold = recorded.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise CorruptError(f"data set '{dataset.name}': manifest.json's near_duplicates has no threshold; "
                           f"run: {dataset.prepare_command()}")
    pairs, distances = _read_pairs(dataset)
    within = recorded.get("within_threshold")
    result = audit(dataset.index, pairs, distances, float(threshold), within if isinstance(within, int) else None)
    clusters = [c for c in result.clusters if include_same_lesion or c["cross_lesion"]]
    return {"name": dataset.name, "path": str(dataset.path), "summary": result.summary,
            "all": include_same_lesion, "clusters": clusters}
