"""Cross-validation folds of a prepared set: its train and val splits together, cut into K grouped folds.

A fold run (``TrainConfig.folds`` K, ``fold`` i) trains on every train+val image outside fold i and
validates on fold i; the test split is never part of a fold. The folds are a pure function of the
set's index (its rows, labels and ``group`` column), K and the seed
(:func:`dermcam.data.split.assign_folds`), so training, its resume, calibration and evaluation all
recompute the same rows from a run's configuration and nothing about them has to be stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.data.split import assign_folds, lesion_table
from dermcam.errors import BadInputError, CorruptError

if TYPE_CHECKING:
    from dermcam.data.dataset import PreparedDataset

FOLD_SPLITS = ("train", "val")  # what cross-validation cuts into folds; test stays untouched


def pooled_rows(data: PreparedDataset) -> np.ndarray:
    """The cache rows of the train and val splits, in row order: what the folds divide."""
    return np.flatnonzero(np.isin(data.index["split"].to_numpy(), FOLD_SPLITS))


def fold_assignment(data: PreparedDataset, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, fold)``: the train+val cache rows and the fold (0..folds-1) of each."""
    rows = pooled_rows(data)
    groups = data.index["group"].to_numpy(dtype=object)[rows]
    labels = data.index["label"].to_numpy(dtype=np.int64)[rows]
    return rows, assign_folds(groups, labels, folds, seed)


def split_rows(data: PreparedDataset, which: str, folds: int | None = None, fold: int | None = None,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows and labels of ``which`` (train, val or test) as a run with this fold setting sees it.

    Without ``folds``: the set's own split. With ``folds`` K and ``fold`` i: val is fold i, train is the
    rest of train+val, and test is the set's test split, as always.
    """
    if folds is None or fold is None or which == "test":
        return data.split(which)
    data.split(which)  # an unknown split name: the same one-line error as without folds
    rows, assigned = fold_assignment(data, folds, seed)
    picked = rows[assigned == fold] if which == "val" else rows[assigned != fold]
    return picked, data.index["label"].to_numpy(dtype=np.int64)[picked]


def fold_setting(config: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """``(folds, fold, seed)`` of a run's stored configuration (a sidecar's or run.json's ``config``), or
    None for an ordinary run. A stored value that is not a valid fold setting is damage (exit 4): read
    as "no folds" it would silently score a fold run's training images as its validation."""
    config = config or {}
    folds, fold, seed = config.get("folds"), config.get("fold"), config.get("seed", 0)
    if folds is None and fold is None:
        return None

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (whole(folds) and whole(fold) and whole(seed) and 2 <= folds <= 1000 and 0 <= fold < folds and seed >= 0):
        raise CorruptError(f"stored configuration has folds={folds!r}, fold={fold!r}, seed={seed!r}, not a fold of "
                           "a cross-validation (damaged or modified)")
    return folds, fold, seed


def check_folds_fit(data: PreparedDataset, folds: int) -> None:
    """Every class needs a group in every fold (each fold run validates on all classes), so K may not
    exceed the number of groups of the smallest class in train+val; one line naming that class."""
    rows = pooled_rows(data)
    labels = data.index["label"].to_numpy(dtype=np.int64)[rows]
    table = lesion_table(data.index["group"].to_numpy(dtype=object)[rows], [data.classes[k] for k in labels])
    counts = table.groupby("label").size()
    missing = [c for c in data.classes if c not in counts.index]
    if missing:
        raise BadInputError(f"--folds {folds}: class {missing[0]} has no image in the train and val splits of data "
                            f"set '{data.name}'")
    smallest = str(counts.idxmin())
    if folds > int(counts.min()):
        raise BadInputError(f"--folds {folds} is more than the {int(counts.min())} groups (lesions, patients) of "
                            f"class {smallest} in the train and val splits of data set '{data.name}': every "
                            "fold needs each class; "
                            + (f"use --folds {int(counts.min())} or fewer" if counts.min() >= 2
                               else "cross-validation needs at least 2 per class"))
