"""Any CSV that names each image's path and label (a team's own export), optionally its lesion,
patient and acquisition source.

Columns are given with ``--image-col``, ``--label-col``, ``--lesion-col`` (or ``--group-col``: the
same thing, images sharing a value stay on one side) and ``--patient-col``, else recognised by
name (:data:`GUESSES`, :data:`~dermcam.data.sources.common.COLUMN_ALIASES`). Image paths are relative
to the CSV's folder; an absolute path, one whose ``..`` leaves that folder, or one that a symlink
leads outside it is a listed skip (``unsafe_path``) and is never opened. A path without an image
extension is tried with each one.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from dermcam.data.problems import Problem
from dermcam.data.sources.common import (
    IMAGE_SUFFIXES,
    SourceFolder,
    SourceTable,
    csv_header,
    digest,
    is_file,
    normalised,
    parse_csv,
    pick_columns,
    read_bytes,
    require_columns,
)
from dermcam.errors import BadInputError

# Column names recognised without an option (lower-cased), in order of preference.
GUESSES = {
    "image": ("image_path", "path", "filepath", "file_path", "filename", "file_name", "file", "image", "img"),
    "label": ("label", "class", "dx", "diagnosis", "class_name"),
}


# Option name -> the normalised column it fills.
TARGETS = {"lesion": "lesion_id", "group": "lesion_id", "patient": "patient_id"}


def _guess(header: list[str], what: str) -> str | None:
    return next((c for c in GUESSES[what] if c in header), None)


def find_csv(folder: SourceFolder) -> Path:
    """The source itself when it is a CSV file, else the folder's only CSV, else BadInputError."""
    if folder.src != folder.root:
        return folder.src
    csvs = folder.top_csvs(folder.root)
    if len(csvs) != 1:
        found = f"{len(csvs)} CSV files ({', '.join(p.name for p in csvs)})" if csvs else "no CSV file"
        raise BadInputError(f"{folder.root} has {found}: give the CSV file itself as SRC")
    return csvs[0]


def detect(folder: SourceFolder) -> str | None:
    """Why the source looks like a folder with one CSV of image paths and labels, or None."""
    csvs = [folder.src] if folder.src != folder.root else folder.top_csvs(folder.root)
    if len(csvs) != 1:
        return None
    header = csv_header(csvs[0])
    image, label = _guess(header, "image"), _guess(header, "label")
    if image is None or label is None:
        return None
    return f"{csvs[0].name} with image column '{image}' and label column '{label}'"


def safe_path(text: str) -> str | None:
    """A path relative to the CSV's folder, normalised (``a/./b`` -> ``a/b``), or None when it is
    absolute (``/x``, ``C:\\x``, ``file:...``) or leaves the folder (``../x``); ``""`` for an empty cell."""
    path = text.strip().replace("\\", "/")
    if not path:
        return ""  # no image named: a missing image_id
    if path.startswith("/") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", path):
        return None
    path = posixpath.normpath(path)
    if path in (".", "..") or path.startswith("../"):
        return None
    return path


def _existing(root: Path, path: str) -> str:
    """``path``, or ``path`` plus the image extension that makes it an existing file."""
    if PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES or is_file(root / path):
        return path
    return next((path + s for s in IMAGE_SUFFIXES if is_file(root / (path + s))), path)


def _columns(table: pd.DataFrame, label: str, given: dict[str, str]) -> dict[str, str]:
    """Which CSV column holds image, label, lesion_id, patient_id...: the options, else guesses."""
    given = {k: v.strip().lower() for k, v in given.items() if v}
    if "group" in given and "lesion" in given:
        raise BadInputError("give --group-col or --lesion-col, not both (they mean the same)")
    unknown = [f"--{k}-col {v}" for k, v in given.items() if v not in table.columns]
    if unknown:
        raise BadInputError(f"{label} has no column {', '.join(unknown)} (columns: {', '.join(table.columns)})")
    chosen = {}
    for what in ("image", "label"):
        chosen[what] = given.get(what) or _guess(list(table.columns), what)
        if chosen[what] is None:
            raise BadInputError(f"cannot tell which column of {label} holds the {what}: give --{what}-col "
                                f"(columns: {', '.join(table.columns)})")
    targets = {TARGETS[k]: v for k, v in given.items() if k in TARGETS}
    return {**chosen, **pick_columns(table.drop(columns=[chosen["image"], chosen["label"]]), targets)}


def _source(folder: SourceFolder, text: str) -> tuple[str | None, str]:
    """A CSV cell's image path as it will be opened (relative to the root, ``""`` when empty), or None
    and why it is never opened: absolute, ``..`` leaving the folder, or a symlink leading outside."""
    path = safe_path(text)
    if path is None:
        return None, f"absolute or outside {folder.root.name}/"
    if not path:
        return "", ""
    path = _existing(folder.root, path)
    real = folder.outside(folder.root / path)
    if real is not None:
        return None, f"a symlink leads it outside {folder.root.name}/ (to {real})"
    return path, ""


def read(folder: SourceFolder, columns: dict[str, str] | None = None) -> SourceTable:
    """The CSV source (a file, or a folder with one CSV) as a source table (see the module doc)."""
    path = find_csv(folder)
    root = folder.root
    data = read_bytes(path)
    table, problems = parse_csv(data, path.name)
    require_columns(table, path.name, [], "")
    chosen = _columns(table, path.name, columns or {})
    lines = np.arange(len(table)) + 2
    cells = table[chosen["image"]]
    paths, reasons = zip(*(_source(folder, p) for p in cells))  # require_columns: at least one row
    unsafe = np.array([p is None for p in paths], dtype=bool)
    problems += [Problem(cells.iloc[i][:200], PurePosixPath(cells.iloc[i]).stem, "unsafe_path",
                         f"CSV line {lines[i]}: {reasons[i]}, not read") for i in np.flatnonzero(unsafe)]
    sources = [p for p in paths if p is not None]
    frame = pd.DataFrame({"source": sources, "image_id": [PurePosixPath(s).stem for s in sources],
                          "dx": table.loc[~unsafe, chosen["label"]].to_numpy()})
    for target, column in chosen.items():
        if target not in ("image", "label"):
            frame[target] = table.loc[~unsafe, column].to_numpy()
    detail = f"CSV {path.name} (image '{chosen['image']}', label '{chosen['label']}'"
    detail += "".join(f", {t} '{c}'" for t, c in chosen.items() if t in ("lesion_id", "patient_id")) + ")"
    return SourceTable("csv", detail, root, normalised(frame, (f"CSV line {n}" for n in lines[~unsafe])),
                       path.name, digest(data), problems=problems, lesion_ids="lesion_id" in chosen)
