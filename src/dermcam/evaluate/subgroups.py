"""Metrics per subgroup (sex, age band, anatomical site, acquisition source), where the set records them.

A model that is good on average can fail one group of patients: acral lesions, older patients, one
clinic's camera. Each subgroup gets the headline metrics with bootstrap intervals; a subgroup with
fewer than :data:`MIN_IMAGES` images says so instead of printing a number nobody should read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dermcam.data.classes import UNKNOWN_LABELS
from dermcam.data.sources.common import MISSING_VALUES

MIN_IMAGES = 30
# (column in index.csv, what the report calls it)
COLUMNS = (("sex", "sex"), ("age", "age band"), ("localization", "site"), ("dataset", "source"))
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75+"))
HEADLINE = ("balanced_accuracy", "macro_f1", "auc_macro")


def age_band(value: str) -> str:
    """``"47.0"`` -> ``"45-59"``; unknown or unreadable ages -> ``""``."""
    try:
        age = float(value)
    except (TypeError, ValueError):
        return ""
    if not np.isfinite(age):
        return ""
    return next((label for low, high, label in AGE_BANDS if low <= age < high), "")


def _order(column: str) -> Callable[[str], Any]:
    """Sort key for a column's values: age bands youngest first, everything else alphabetically."""
    if column == "age":
        bands = [label for _, _, label in AGE_BANDS]
        return bands.index
    return str


def subgroup_values(index: Any, column: str) -> np.ndarray:
    """The subgroup label of each row for ``column`` ('' where unknown)."""
    if column not in index.columns:
        return np.full(len(index), "", dtype=object)
    values = index[column].fillna("").astype(str).str.strip()
    if column == "age":
        return np.array([age_band(v) for v in values], dtype=object)
    values = values.str.lower()
    # "unknown" is how HAM10000 writes a missing sex or site: no subgroup, like an empty cell
    return values.where(~values.isin(MISSING_VALUES | UNKNOWN_LABELS), "").to_numpy(dtype=object)


def subgroup_metrics(y_true: np.ndarray, probs: np.ndarray, index: Any, groups: Sequence[str],
                     classes: Sequence[str], *, scored: Sequence[int] | None = None,
                     min_images: int = MIN_IMAGES, resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One entry per (column, value) present in ``index`` (the rows scored, in order)."""
    from dermcam.evaluate.bootstrap import confidence_intervals
    from dermcam.evaluate.metrics import compute_metrics

    groups = np.asarray(groups, dtype=object)
    out: list[dict[str, Any]] = []
    for column, title in COLUMNS:
        values = subgroup_values(index, column)
        known = sorted(set(values) - {""}, key=_order(column))
        if len(known) < 2:  # one value (or none) is not a subgroup analysis
            continue
        for value in known:
            mask = values == value
            entry: dict[str, Any] = {"column": column, "title": title, "value": value, "n": int(mask.sum())}
            if mask.sum() < min_images:
                entry["note"] = f"too few images (fewer than {min_images})"
            else:
                metrics = compute_metrics(y_true[mask], probs[mask], classes, scored=scored)
                entry["metrics"] = {k: metrics[k] for k in (*HEADLINE, *(f"recall_{c}" for c in classes))}
                # A class with no image in the subgroup has no recall (not 0): None, and no interval
                absent = {f"recall_{c}" for c in classes if metrics[f"support_{c}"] == 0}
                entry["metrics"].update(dict.fromkeys(absent))
                if resamples:
                    ci = confidence_intervals(y_true[mask], probs[mask], groups[mask], classes, scored=scored,
                                              resamples=resamples, seed=seed)
                    entry["ci"] = {k: None if k in absent else ci.ci.get(k) for k in entry["metrics"]}
            out.append(entry)
    return out
