"""The HAM10000 layout as Kaggle ships it: ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/`` and ``_2/``.

:func:`read_metadata` parses the CSV, :func:`clean_rows` repairs or drops bad rows (each reported as a
:class:`~dermcam.data.problems.Problem`), and :func:`match_files` attaches each row's image file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from dermcam.data.classes import CLASS_CODES
from dermcam.data.problems import Problem
from dermcam.errors import BadInputError
from dermcam.store.files import sha256_file

METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


REQUIRED_COLUMNS = ("image_id", "dx")


OPTIONAL_COLUMNS = tuple(c for c in METADATA_COLUMNS if c not in REQUIRED_COLUMNS)


# Cell values that mean "no value" in optional columns, compared stripped and lower-cased.
MISSING_VALUES = frozenset({"", "nan", "na", "n/a", "none", "null"})


IMAGE_FOLDERS = ("ham10000_images_part_1", "ham10000_images_part_2", "images")  # matched case-insensitively


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def find_metadata_csv(src: Path) -> Path:
    """``HAM10000_metadata.csv`` (any case) in ``src``, else the folder's only CSV, else BadInputError."""
    csvs = [p for p in _entries(src) if p.suffix.lower() == ".csv" and _is_file(p)]
    for path in csvs:
        if path.name.lower() == "ham10000_metadata.csv":
            return path
    if len(csvs) == 1:
        return csvs[0]
    found = f" (found {len(csvs)} CSV files, none named HAM10000_metadata.csv)" if csvs else ""
    raise BadInputError(f"{src} has no metadata CSV: expected HAM10000_metadata.csv{found}")


def read_metadata(data: bytes, label: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse the metadata CSV into strings (columns normalised), or a one-line BadInputError."""
    if not data.strip():
        raise BadInputError(f"{label} is empty")
    if b"\x00" in data[:8192]:
        raise BadInputError(f"{label} is not a CSV file (it contains binary data)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    try:
        # header=None: the header is checked here (pandas would silently rename a repeated column to
        # "dx.1", and would take the first column as an index when rows have one field too many).
        cells = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True,
                            header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BadInputError(f"{label} is not a valid CSV file: {_first_line(exc)}") from None
    header = [str(c).strip().lower() for c in cells.iloc[0]]
    table = cells.iloc[1:].fillna("").reset_index(drop=True)
    table.columns = header
    repeated = sorted({c for c in header if header.count(c) > 1 and c})
    if repeated:
        raise BadInputError(f"{label} has the column {', '.join(repr(c) for c in repeated)} more than once "
                            "(column names are compared ignoring case and spaces)")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise BadInputError(f"{label} lacks the column(s) {', '.join(missing)}; a HAM10000 metadata CSV has "
                            f"{', '.join(METADATA_COLUMNS)}")
    if table.empty:
        raise BadInputError(f"{label} has a header but no rows")
    problems = []
    for column in METADATA_COLUMNS:
        if column not in table.columns:
            table[column] = ""
            effect = "each image is its own lesion" if column == "lesion_id" else "filled with empty values"
            problems.append(Problem(label, "", "missing_column", f"column '{column}' absent: {effect}"))
    table = table[list(METADATA_COLUMNS)].apply(lambda col: col.str.strip())
    for column in OPTIONAL_COLUMNS:
        table[column] = blank_missing(table[column])
    table["dx"] = table["dx"].str.lower()
    table["line"] = np.arange(len(table)) + 2  # line number in the CSV, for messages
    return table, problems


def blank_missing(column: pd.Series) -> pd.Series:
    """``column`` with every spelling of "no value" (NaN, NA, N/A, None, null, any case) made empty.

    Exported spreadsheets write missing cells in all these ways; taken literally, every row whose
    lesion_id says "NaN" would be one giant lesion, forced into a single split.
    """
    return column.where(~column.str.strip().str.lower().isin(MISSING_VALUES), "")


def _first_line(exc: BaseException) -> str:
    """The first line of a parser message (or the exception's name): errors stay one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def find_images(src: Path) -> tuple[dict[str, list[str]], list[Problem]]:
    """Image files in the known image folders: image_id (file stem) -> paths relative to ``src``.

    An entry with an image suffix that is not a readable regular file (a broken link, a link loop, a
    folder named ``x.jpg``) is reported and left out; a CSV row naming it is then a missing_image.
    """
    folders = [p for p in _entries(src) if p.name.lower() in IMAGE_FOLDERS and p.is_dir()]
    if not folders:
        raise BadInputError(f"{src} has no image folder: expected HAM10000_images_part_1/, "
                            "HAM10000_images_part_2/ or images/")
    files: dict[str, list[str]] = {}
    problems: list[Problem] = []
    for folder in folders:
        for path in _entries(folder):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            relative = path.relative_to(src).as_posix()
            if _is_file(path):
                files.setdefault(path.stem, []).append(relative)
            else:
                problems.append(Problem(relative, path.stem, "unreadable",
                                        "not a regular file (a folder, a broken link or a link loop)"))
    return files, problems


def _entries(folder: Path) -> list[Path]:
    """The folder's entries, sorted, or a one-line BadInputError (unreadable, a symlink loop...)."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise BadInputError(f"cannot list {folder}: {exc.strerror or _first_line(exc)}") from None


def _is_file(path: Path) -> bool:
    """A regular file (after symlinks) that can be stat'ed; anything else is not taken as input."""
    try:
        return path.is_file()
    except OSError:
        return False


def clean_rows(table: pd.DataFrame, label: str, classes: list[str]) -> tuple[pd.DataFrame, list[Problem], int]:
    """Drop or repair bad CSV rows; keep the chosen classes. Returns rows, problems, rows excluded."""
    problems: list[Problem] = []
    no_id = table["image_id"] == ""
    problems += [Problem(label, "", "missing_image_id", f"CSV line {n}") for n in table.loc[no_id, "line"]]
    table = table[~no_id]
    unknown = ~table["dx"].isin(CLASS_CODES)
    problems += [Problem(label, r.image_id, "unknown_dx", f"dx '{r.dx}' on CSV line {r.line}")
                 for r in table[unknown].itertuples()]
    table = table[~unknown]

    columns = list(METADATA_COLUMNS)
    duplicated = table["image_id"].duplicated(keep=False)
    keep = ~duplicated
    for image_id, rows in table[duplicated].groupby("image_id", sort=False):
        lines = ", ".join(str(n) for n in rows["line"])
        if len(rows[columns].drop_duplicates()) == 1:
            keep[rows.index[0]] = True
            problems += [Problem(label, image_id, "listed_twice", f"CSV line {n} repeats line {rows['line'].iloc[0]}")
                         for n in rows["line"].iloc[1:]]
        else:
            differ = [c for c in columns if rows[c].nunique() > 1]
            problems.append(Problem(label, image_id, "duplicate_image_id",
                                    f"CSV lines {lines} disagree on {', '.join(differ)}"))
    table = table[keep]

    chosen = table["dx"].isin(classes)
    excluded = int((~chosen).sum())
    table = table[chosen].copy()
    no_lesion = table["lesion_id"] == ""
    problems += [Problem(label, r.image_id, "missing_lesion_id", f"CSV line {r.line}: treated as its own lesion")
                 for r in table[no_lesion].itertuples()]
    return table, problems, excluded


def match_files(table: pd.DataFrame, files: dict[str, list[str]], all_ids: set[str],
                 src: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Attach each row's image file; report missing, duplicated and unlisted files."""
    problems = [Problem(path, image_id, "unlisted_image", "image file not named in the metadata CSV")
                for image_id, paths in files.items() if image_id not in all_ids for path in paths]
    sources: list[str | None] = []
    for row in table.itertuples():
        paths = files.get(row.image_id)
        if not paths:
            problems.append(Problem("", row.image_id, "missing_image", f"no image file for CSV line {row.line}"))
            sources.append(None)
        elif len(paths) == 1:
            sources.append(paths[0])
        elif len({sha256_file(src / p) for p in paths}) == 1:
            problems.append(Problem(paths[0], row.image_id, "duplicate_file",
                                    f"identical copies {', '.join(paths)}: using the first"))
            sources.append(paths[0])
        else:
            problems.append(Problem(paths[0], row.image_id, "conflicting_files",
                                    f"different files {', '.join(paths)} share this image_id"))
            sources.append(None)
    table = table.assign(source=sources)
    return table[table["source"].notna()], problems
