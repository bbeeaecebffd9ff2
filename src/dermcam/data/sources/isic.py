"""The ISIC challenge layouts: a ground-truth CSV beside a folder of images (found by file stem).

Two kinds of ground truth:

- one-hot (ISIC 2018 task 3, ISIC 2019): ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` (2019: ``AK`` for
  akiec, plus ``SCC`` and ``UNK``); the column at 1 is the class. A row with no 1, several 1s or a
  cell that is not a number is skipped as ``ambiguous_label``; ``UNK`` rows as ``unknown_dx``.
- ISIC 2020: ``image_name,patient_id,lesion_id?,sex,age_approx,anatom_site_general_challenge,
  diagnosis,...``; ``diagnosis`` is mapped onto HAM10000's codes where one fits (:data:`DIAGNOSES`).

The ground truth is looked for in the source folder, else one folder down (ISIC 2018 ships it in
``ISIC2018_Task3_Training_GroundTruth/``). Other CSVs beside it with an image id column and known
metadata columns (ISIC 2019's ``ISIC_2019_Training_Metadata.csv``, ISIC 2018's lesion groupings)
are joined by image id. Images are found in the source folder and the folders one level down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dermcam.data.problems import Problem
from dermcam.data.sources.common import (
    COLUMN_ALIASES,
    SourceFolder,
    SourceTable,
    blank_missing,
    csv_header,
    digest,
    normalised,
    parse_csv,
    pick_columns,
    read_bytes,
    require_columns,
)
from dermcam.errors import BadInputError

# One-hot column (lower-cased) -> class; "unk" is then skipped as an unknown class.
ONE_HOT = {"mel": "mel", "nv": "nv", "bcc": "bcc", "akiec": "akiec", "ak": "akiec", "bkl": "bkl", "df": "df",
           "vasc": "vasc", "scc": "scc", "unk": "unk"}


# ISIC 2020 diagnosis (lower-cased) -> class; any other value keeps its own name ("unknown" is skipped).
DIAGNOSES = {"melanoma": "mel", "nevus": "nv", "seborrheic keratosis": "bkl", "lentigo nos": "bkl",
             "lichenoid keratosis": "bkl", "solar lentigo": "bkl", "basal cell carcinoma": "bcc"}


ID_COLUMNS = ("image", "image_name", "isic_id")


def _kind(header: list[str]) -> str | None:
    """``one-hot`` or ``2020`` (a ground truth), ``metadata`` (joinable), or None."""
    columns = set(header)
    if "image" in columns and len(columns & ONE_HOT.keys()) >= 2:
        return "one-hot"
    if "image_name" in columns and "diagnosis" in columns:
        return "2020"
    aliases = {a for names in COLUMN_ALIASES.values() for a in names}
    if columns & set(ID_COLUMNS) and columns & aliases:
        return "metadata"
    return None


def find_ground_truth(folder: SourceFolder) -> Path | None:
    """The ground-truth CSV in the source folder, else in a folder one level down; None when there is none.

    Several candidates at the same level are a BadInputError: which one is meant is not guessed.
    """
    for level in ([folder.root], folder.subfolders(folder.root)):
        found = [p for sub in level for p in folder.top_csvs(sub) if _kind(csv_header(p)) in ("one-hot", "2020")]
        if len(found) > 1:
            names = ", ".join(folder.relative(p) for p in found)
            raise BadInputError(f"{folder.root} has several ISIC ground-truth CSVs ({names}): give a folder with one")
        if found:
            return found[0]
    return None


def detect(folder: SourceFolder) -> str | None:
    """Why the source looks like an ISIC challenge folder, or None."""
    path = find_ground_truth(folder)
    return None if path is None else f"ISIC ground truth {folder.relative(path)}"


def _one_hot(table: pd.DataFrame, label: str) -> tuple[pd.Series, pd.Series, list[Problem]]:
    """The class of each row (rows that have none are dropped by the mask) and the problems."""
    codes = [c for c in table.columns if c in ONE_HOT]
    values = table[codes].apply(pd.to_numeric, errors="coerce")
    ones = values == 1
    count = ones.sum(axis=1)
    not_numbers = values.isna().any(axis=1)
    ok = (count == 1) & ~not_numbers
    problems = []
    for i in np.flatnonzero(~ok.to_numpy()):
        row = table.iloc[i]
        if not_numbers.iloc[i]:
            reason = "a class column is not a number"
        elif count.iloc[i] == 0:
            reason = "no class column is 1"
        else:
            reason = f"several class columns are 1 ({', '.join(c.upper() for c in codes if ones.iloc[i][c])})"
        problems.append(Problem(label, row["image"], "ambiguous_label", f"CSV line {i + 2}: {reason}"))
    dx = ones.idxmax(axis=1).map(ONE_HOT) if codes else pd.Series("", index=table.index)
    return dx, ok, problems


def _join_metadata(frame: pd.DataFrame, paths: list[Path], problems: list[Problem]) -> list[bytes]:
    """Fill empty optional columns of ``frame`` from the metadata CSVs, by image id; returns their bytes
    (problems reading them are added to ``problems``)."""
    contents = []
    for path in paths:
        data = read_bytes(path)
        contents.append(data)
        meta, found = parse_csv(data, path.name)
        problems += found
        key = next(c for c in ID_COLUMNS if c in meta.columns)
        meta = meta[meta[key] != ""].drop_duplicates(key).set_index(key)
        for target, column in pick_columns(meta).items():
            values = frame["image_id"].map(blank_missing(meta[column])).fillna("")
            current = frame[target] if target in frame.columns else pd.Series("", index=frame.index)
            frame[target] = current.where(current != "", values)
    return contents


def read(folder: SourceFolder) -> SourceTable:
    """The ISIC source ``folder`` as a source table (see the module doc)."""
    path = find_ground_truth(folder)
    if path is None:
        raise BadInputError(f"{folder.root} has no ISIC ground-truth CSV: expected one with columns "
                            "image,MEL,NV,... (one-hot) or image_name,...,diagnosis (ISIC 2020)")
    label = folder.relative(path)
    data = read_bytes(path)
    table, problems = parse_csv(data, label)
    kind = _kind(list(table.columns))
    ident = "image" if kind == "one-hot" else "image_name"
    require_columns(table, label, [ident], "an ISIC ground truth names each image")
    if kind == "one-hot":
        dx, ok, found = _one_hot(table, label)
        problems += found
    else:
        dx = table["diagnosis"].str.lower().str.split().str.join(" ")
        dx, ok = dx.map(lambda d: DIAGNOSES.get(d, d)), pd.Series(True, index=table.index)
    listed = set(table[ident])
    frame = pd.DataFrame({"image_id": table[ident], "dx": dx})
    for target, column in pick_columns(table).items():
        frame[target] = blank_missing(table[column])
    frame, where = frame[ok].copy(), [f"CSV line {n}" for n in np.flatnonzero(ok.to_numpy()) + 2]
    metadata = [p for p in folder.top_csvs(path.parent) if p != path and _kind(csv_header(p)) == "metadata"]
    contents = _join_metadata(frame, metadata, problems)
    lesion_ids = "lesion_id" in frame.columns
    files, scan_problems = folder.find_images([folder.root, *folder.subfolders(folder.root)])
    detail = f"ISIC {kind} ground truth {label}"
    if metadata:
        detail += f"; metadata {', '.join(folder.relative(p) for p in metadata)}"
    return SourceTable("isic", detail, folder.root, normalised(frame, where), label, digest(data, *contents),
                       problems=problems, scan_problems=scan_problems, files=files, listed=listed,
                       lesion_ids=lesion_ids)
