"""Grouped train/val/test splits: no lesion and no patient ever sits on two sides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: the CLI reads the defaults below without it
    import pandas as pd

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


GROUP_KINDS = ("lesion", "patient", "image")


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find: for each of ``n`` nodes the smallest node it is joined to through the (m, 2) ``edges``."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in np.asarray(edges, dtype=np.int64).reshape(-1, 2).tolist():
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def group_keys(table: pd.DataFrame, pairs: np.ndarray | Sequence[tuple[int, int]] | None = None) -> pd.Series:
    """The grouping key of each row: images that share a lesion id *or* a patient id, or that ``pairs``
    joins, are one group.

    ``pairs``: extra edges, (m, 2) row positions (0 .. len(table) - 1) of images that must stay
    together although their ids differ (near-duplicates: :mod:`dermcam.data.fingerprint`). Grouping
    is one transitive closure over all three (a patient's lesions, every image of each, and every
    near-duplicate of any of them form one group), so neither a lesion, a patient nor a copy of an
    image can sit on two sides of a split. A group with a patient id is keyed
    ``patient:<smallest patient id>``, else by its smallest lesion id (HAM10000's lesion keys,
    unchanged), else ``image:<image_id>``; without pairs the keys are those of ids alone. (A table
    without a ``patient_id`` column, such as an index.csv written before it existed, groups by lesion
    alone.)
    """
    import pandas as pd

    lesions = table["lesion_id"].to_numpy(dtype=object)
    patients = (table["patient_id"].to_numpy(dtype=object) if "patient_id" in table.columns
                else np.full(len(table), "", dtype=object))
    edges = [np.asarray(pairs if pairs is not None else [], dtype=np.int64).reshape(-1, 2)]
    if len(edges[0]) and (edges[0].min() < 0 or edges[0].max() >= len(table)):
        raise ValueError(f"pairs name rows outside 0..{len(table) - 1}")
    for ids in (lesions, patients):  # each row joined to the first row with its id
        first: dict[str, int] = {}
        edges.append(np.array([(i, first.setdefault(key, i)) for i, key in enumerate(ids) if key],
                              dtype=np.int64).reshape(-1, 2))
    root = components(len(table), np.concatenate(edges))
    members: dict[int, list[int]] = {}
    for i in range(len(table)):
        members.setdefault(int(root[i]), []).append(i)
    keys = [""] * len(table)
    image_ids = table["image_id"].to_numpy(dtype=object)
    for rows in members.values():
        patient = min((patients[i] for i in rows if patients[i]), default="")
        lesion = min((lesions[i] for i in rows if lesions[i]), default="")
        key = f"patient:{patient}" if patient else lesion or f"image:{image_ids[rows[0]]}"
        for i in rows:
            keys[i] = key
    return pd.Series(keys, index=table.index, dtype=object)


def group_kinds(groups: Sequence[str]) -> dict[str, int]:
    """How many groups of each kind (lesion, patient, image) ``groups`` has: what the split kept together."""
    counts = dict.fromkeys(GROUP_KINDS, 0)
    for group in set(groups):
        kind = group.split(":", 1)[0] if group.startswith(("patient:", "image:")) else "lesion"
        counts[kind] += 1
    return counts


def lesion_table(groups: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    """One row per lesion: its image count and majority label."""
    import pandas as pd

    frame = pd.DataFrame({"group": list(groups), "label": list(labels)})
    counts = frame.groupby(["group", "label"]).size().rename("n").reset_index()
    majority = counts.sort_values(["group", "n"], ascending=[True, False], kind="stable").drop_duplicates("group")
    size = frame.groupby("group").size().rename("size")
    return majority.set_index("group")[["label"]].join(size)


def split_by_lesion(groups: Sequence[str], labels: Sequence[str], fractions: Sequence[float],
                    seed: int) -> np.ndarray:
    """Assign each row to train/val/test so that a group (lesion) never spans two splits.

    Stratified per class: the class's lesions are taken in a seeded random order and each goes to
    the split that is proportionally furthest behind its target image count (filled / target), so
    the splits fill up in step. Grouping is exact by construction, image ratios per class end
    within one lesion of the fractions, lesion sizes are spread evenly (no split gets only the
    single-image lesions), and even a class of three lesions puts one in each split.
    """
    rng = np.random.default_rng(seed)
    wanted = np.asarray(fractions, dtype=float)
    assignment: dict[str, str] = {}
    for _, members in lesion_table(groups, labels).groupby("label", sort=True):
        members = members.iloc[rng.permutation(len(members))]
        target = wanted * members["size"].sum()
        filled = np.zeros(len(SPLITS))
        for name, size in members["size"].items():
            behind = np.where(target > 0, filled / np.where(target > 0, target, 1), np.inf)
            split = int(np.argmin(behind))
            assignment[name] = SPLITS[split]
            filled[split] += size
    return np.array([assignment[g] for g in groups], dtype=object)


def assign_folds(groups: Sequence[str], labels: Sequence[object], k: int, seed: int) -> np.ndarray:
    """Cross-validation folds 0..k-1 for each row, filled the way :func:`split_by_lesion` fills splits.

    A group (lesion, patient or near-duplicate cluster: the index's ``group`` column) goes whole into
    one fold. Per class (a group's majority label), the groups are taken in a seeded random order and
    each goes to the fold that is furthest behind its equal share of the class's images; ties go to the
    fold with fewer images over all classes, so the first group of every class does not always land in
    fold 0 and the folds end up of nearly equal size. A class of at least ``k`` groups has a group in
    every fold. The result depends on the rows given, their order and ``seed`` only.
    """
    rng = np.random.default_rng(seed)
    labels = [str(label) for label in labels]
    fold_of: dict[str, int] = {}
    total = np.zeros(k)
    for _, members in lesion_table(groups, labels).groupby("label", sort=True):
        members = members.iloc[rng.permutation(len(members))]
        target = members["size"].sum() / k
        filled = np.zeros(k)
        for name, size in members["size"].items():
            fold = int(np.lexsort((np.arange(k), total, filled / target))[0])
            fold_of[name] = fold
            filled[fold] += size
            total[fold] += size
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def leakage_audit(groups: Sequence[str], splits: Sequence[str]) -> dict[str, int]:
    """How many groups (lesions) each pair of splits shares; a correct split has zeros everywhere."""
    import pandas as pd

    frame = pd.DataFrame({"group": list(groups), "split": list(splits)})
    members = {s: set(frame.loc[frame["split"] == s, "group"]) for s in SPLITS}
    return {f"{a}/{b}": len(members[a] & members[b])
            for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]}


def cap_per_class(table: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` images per class, taking whole lesions in a seeded random order."""
    rng = np.random.default_rng(seed)
    groups = group_keys(table)
    keep: set[str] = set()
    for _, lesions in lesion_table(groups, table["dx"]).groupby("label", sort=True):
        lesions = lesions.iloc[rng.permutation(len(lesions))]
        total = 0
        for name, size in lesions["size"].items():
            if total + size <= max_per_class:
                keep.add(name)
                total += size
    return table[groups.isin(keep)]
