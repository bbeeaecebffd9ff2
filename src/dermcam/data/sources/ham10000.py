"""The HAM10000 layout as Kaggle ships it: ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/`` and ``_2/``.

:func:`read_metadata` parses the CSV and :func:`find_images` lists the image folders; :func:`read`
returns both as a :class:`~dermcam.data.sources.common.SourceTable` (rows matched to their files by
``image_id``). The full Harvard Dataverse metadata's ``dataset`` column (acquisition source) is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dermcam.data.problems import Problem
from dermcam.data.sources.common import (
    SourceFolder,
    SourceTable,
    csv_header,
    digest,
    is_dir,
    is_file,
    normalised,
    parse_csv,
    read_bytes,
    require_columns,
)
from dermcam.errors import BadInputError

METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


REQUIRED_COLUMNS = ("image_id", "dx")


# Optional columns read when present, without a missing_column report when absent (Kaggle has neither).
EXTRA_COLUMNS = ("dataset", "patient_id")


IMAGE_FOLDERS = ("ham10000_images_part_1", "ham10000_images_part_2", "images")  # matched case-insensitively


def detect(folder: SourceFolder) -> str | None:
    """Why the source looks like HAM10000 (its metadata CSV or image folders), or None."""
    found = {p.name.lower(): p for p in folder.entries(folder.root, lambda p: (
        is_file(p) if p.name.lower().endswith(".csv") else is_dir(p)))}
    if "ham10000_metadata.csv" in found:
        return found["ham10000_metadata.csv"].name
    for name in IMAGE_FOLDERS[:2]:
        if name in found:
            return f"{found[name].name}/"
    if "images" in found:
        for path in folder.top_csvs(folder.root):
            header = csv_header(path)
            if "image_id" in header and "dx" in header:
                return f"{path.name} with image_id and dx, beside images/"
    return None


def find_metadata_csv(folder: SourceFolder) -> Path:
    """``HAM10000_metadata.csv`` (any case) in the source, else its only CSV, else BadInputError."""
    csvs = folder.top_csvs(folder.root)
    for path in csvs:
        if path.name.lower() == "ham10000_metadata.csv":
            return path
    if len(csvs) == 1:
        return csvs[0]
    found = f" (found {len(csvs)} CSV files, none named HAM10000_metadata.csv)" if csvs else ""
    raise BadInputError(f"{folder.root} has no metadata CSV: expected HAM10000_metadata.csv{found}")


def read_metadata(data: bytes, label: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse the metadata CSV into the normalised table, or a one-line BadInputError."""
    table, problems = parse_csv(data, label)
    require_columns(table, label, REQUIRED_COLUMNS,
                    f"a HAM10000 metadata CSV has {', '.join(METADATA_COLUMNS)}")
    for column in METADATA_COLUMNS:
        if column not in table.columns:
            table[column] = ""
            effect = "each image is its own lesion" if column == "lesion_id" else "filled with empty values"
            problems.append(Problem(label, "", "missing_column", f"column '{column}' absent: {effect}"))
    lines = np.arange(len(table)) + 2  # line number in the CSV, for messages
    kept = [c for c in (*METADATA_COLUMNS, *EXTRA_COLUMNS) if c in table.columns]
    return normalised(table[kept], (f"CSV line {n}" for n in lines)), problems


def find_images(folder: SourceFolder) -> tuple[dict[str, list[str]], list[Problem]]:
    """Image files in the known image folders: image_id (file stem) -> paths relative to the root."""
    folders = folder.entries(folder.root, lambda p: p.name.lower() in IMAGE_FOLDERS and is_dir(p))
    if not folders:
        raise BadInputError(f"{folder.root} has no image folder: expected HAM10000_images_part_1/, "
                            "HAM10000_images_part_2/ or images/")
    return folder.find_images(folders)


def read(folder: SourceFolder) -> SourceTable:
    """The HAM10000 source ``folder`` as a source table (see the module doc)."""
    csv_path = find_metadata_csv(folder)
    data = read_bytes(csv_path)
    table, problems = read_metadata(data, csv_path.name)
    files, scan_problems = find_images(folder)
    folders = sorted({path.split("/")[0] + "/" for paths in files.values() for path in paths})
    detail = f"metadata {csv_path.name}, images in {', '.join(folders) or 'no folder'}"
    return SourceTable("ham10000", detail, folder.root, table, csv_path.name, digest(data), problems=problems,
                       scan_problems=scan_problems, files=files, listed=set(table["image_id"]), lesion_ids=True)
