"""Cleaning that does not depend on the layout: class names, duplicates, the class choice, missing
ids, and matching each row to its image file. Every row dropped or repaired is a reported Problem.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermcam.data.classes import UNKNOWN_LABELS, is_plain_name, normalise_class
from dermcam.data.problems import Problem
from dermcam.data.sources.common import COLUMNS, is_file
from dermcam.store.files import sha256_file


def _places(wheres: list[str]) -> str:
    """``CSV line 3``, ``CSV line 9`` -> ``CSV lines 3, 9`` (other places are listed as they are)."""
    if all(w.startswith("CSV line ") for w in wheres):
        return "CSV lines " + ", ".join(w.removeprefix("CSV line ") for w in wheres)
    return ", ".join(wheres)


def _bad_labels(table: pd.DataFrame, label: str) -> tuple[pd.Series, list[Problem]]:
    """Rows whose label is empty, unknown (UNK) or not a plain class name: a mask and their problems."""
    problems = []
    unknown = table["dx"].isin(UNKNOWN_LABELS) | (table["dx"] == "")
    bad = unknown | ~table["dx"].map(is_plain_name)
    for r in table[bad].itertuples():
        reason = "unknown class" if r.dx in UNKNOWN_LABELS else "no label" if not r.dx else \
            "not a plain class name (1-40 letters, digits, '_', '-' or '+')"
        problems.append(Problem(label or r.source, r.image_id, "unknown_dx", f"dx '{r.dx}' on {r.where}: {reason}"))
    return bad, problems


def _duplicates(table: pd.DataFrame, label: str) -> tuple[pd.Series, list[Problem]]:
    """Identical rows for one image are kept once; rows that disagree are all dropped."""
    problems = []
    columns = list(COLUMNS)
    duplicated = table["image_id"].duplicated(keep=False)
    keep = ~duplicated
    for image_id, rows in table[duplicated].groupby("image_id", sort=False):
        if len(rows[columns].drop_duplicates()) == 1:
            keep[rows.index[0]] = True
            first = rows["where"].iloc[0]
            problems += [Problem(label or rows["source"].iloc[0], image_id, "listed_twice",
                                 f"{w} repeats {first.removeprefix('CSV ')}") for w in rows["where"].iloc[1:]]
        else:
            differ = [c for c in columns if rows[c].nunique() > 1]
            problems.append(Problem(label or ", ".join(rows["source"]), image_id, "duplicate_image_id",
                                    f"{_places(list(rows['where']))} disagree on {', '.join(differ)}"))
    return keep, problems


def drop_bad_rows(table: pd.DataFrame, label: str) -> tuple[pd.DataFrame, list[Problem]]:
    """The rows with an image id and a usable label, each image once (class names normalised), and the
    problems of the rows dropped or merged. Several sources are cleaned one by one with this before
    the classes are chosen over all of them (:func:`keep_classes`)."""
    problems: list[Problem] = []
    no_id = table["image_id"] == ""
    problems += [Problem(label, "", "missing_image_id", w) for w in table.loc[no_id, "where"]]
    table = table[~no_id].assign(dx=lambda t: t["dx"].map(normalise_class))
    bad, found = _bad_labels(table, label)
    problems += found
    table = table[~bad]
    keep, found = _duplicates(table, label)
    return table[keep], problems + found


def keep_classes(table: pd.DataFrame, classes: list[str], label: str,
                 lesion_ids: bool) -> tuple[pd.DataFrame, list[Problem], dict[str, int]]:
    """The rows of ``classes``, the missing-lesion-id problems among them (when the source records
    lesions) and the images of the other classes, by class."""
    chosen = table["dx"].isin(classes)
    other = table.loc[~chosen, "dx"].value_counts()
    table = table[chosen].copy()
    problems = []
    if lesion_ids:
        for r in table[table["lesion_id"] == ""].itertuples():
            effect = f"grouped by patient {r.patient_id}" if r.patient_id else "treated as its own lesion"
            problems.append(Problem(label or r.source, r.image_id, "missing_lesion_id", f"{r.where}: {effect}"))
    return table, problems, {c: int(other[c]) for c in sorted(other.index)}


def match_files(table: pd.DataFrame, files: dict[str, list[str]], listed: set[str],
                root: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Attach each row's image file; report missing, duplicated and unlisted files.

    A row with a ``source`` (folder and CSV layouts) must name a regular file; a row without one
    is matched by its image_id among ``files`` (layouts whose metadata names images by id).
    """
    problems = [Problem(path, image_id, "unlisted_image", "image file not named in the metadata CSV")
                for image_id, paths in files.items() if image_id not in listed for path in paths]
    sources: list[str | None] = []
    for row in table.itertuples():
        if row.source:
            found = is_file(root / row.source)
            if not found:
                problems.append(Problem(row.source, row.image_id, "missing_image", f"no image file ({row.where})"))
            sources.append(row.source if found else None)
            continue
        paths = files.get(row.image_id)
        if not paths:
            problems.append(Problem("", row.image_id, "missing_image", f"no image file for {row.where}"))
            sources.append(None)
        elif len(paths) == 1:
            sources.append(paths[0])
        elif len({sha256_file(root / p) for p in paths}) == 1:
            problems.append(Problem(paths[0], row.image_id, "duplicate_file",
                                    f"identical copies {', '.join(paths)}: using the first"))
            sources.append(paths[0])
        else:
            problems.append(Problem(paths[0], row.image_id, "conflicting_files",
                                    f"different files {', '.join(paths)} share this image_id"))
            sources.append(None)
    table = table.assign(source=sources)
    return table[table["source"].notna()], problems
