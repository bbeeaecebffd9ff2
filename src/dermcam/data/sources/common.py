"""What every layout reader shares: the normalised table it returns, CSV parsing, finding image files.

A reader returns a :class:`SourceTable`: one row per image listed by the source, in the columns of
:data:`COLUMNS` (strings, empty when unknown), plus ``where`` (a place for messages, such as
``CSV line 7``). The cleaning that is not layout-specific (class names, duplicates, class choice,
missing ids, matching files) is :mod:`dermcam.data.clean`; hashing, splitting and the cache are
:mod:`dermcam.data.prepare`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermcam.data.problems import Problem
from dermcam.errors import BadInputError, first_line

# The normalised table: ``source`` is the image path relative to the source folder, or empty when the
# file is found by its stem (``image_id``) among ``SourceTable.files``.
COLUMNS = ("image_id", "source", "dx", "lesion_id", "patient_id", "dataset", "dx_type", "age", "sex",
           "localization")


# Cell values that mean "no value" in optional columns, compared stripped and lower-cased.
MISSING_VALUES = frozenset({"", "nan", "na", "n/a", "none", "null"})


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


# Column names (lower-cased) that ISIC files and teams' own CSVs use for the optional columns.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "lesion_id": ("lesion_id", "lesion"),
    "patient_id": ("patient_id", "patient"),
    "dataset": ("dataset",),
    "dx_type": ("dx_type", "diagnosis_confirm_type"),
    "age": ("age", "age_approx"),
    "sex": ("sex",),
    "localization": ("localization", "anatom_site_general", "anatom_site_general_challenge", "anatom_site"),
}


@dataclass
class SourceTable:
    """One source as read by its layout's reader, before any cleaning."""

    layout: str
    detail: str  # what was read, for the summary ("ISIC one-hot ground truth x.csv; metadata y.csv")
    root: Path  # the folder that ``source`` paths are relative to
    table: pd.DataFrame  # COLUMNS + "where"
    label: str  # the file named in row problems (the CSV's name, or the folder)
    digest: str  # sha256 over the metadata read (CSV bytes, or the listing of a folder layout)
    problems: list[Problem] = field(default_factory=list)  # found reading the metadata
    scan_problems: list[Problem] = field(default_factory=list)  # found listing the image files
    files: dict[str, list[str]] = field(default_factory=dict)  # image_id -> files, for stem-matched layouts
    listed: set[str] = field(default_factory=set)  # every image_id the metadata names (also skipped rows)
    lesion_ids: bool = False  # the source records lesions: an empty lesion_id is reported


def normalised(frame: pd.DataFrame, where: Iterable[str]) -> pd.DataFrame:
    """``frame`` with every column of COLUMNS (missing ones empty), stripped, "no value" spellings
    blanked (all but image_id and source), and ``where``."""
    table = pd.DataFrame({c: (frame[c].astype(str) if c in frame.columns else "") for c in COLUMNS},
                         index=frame.index).apply(lambda col: col.str.strip())
    for column in COLUMNS[2:]:
        table[column] = blank_missing(table[column])
    table["where"] = list(where)
    return table.reset_index(drop=True)


def blank_missing(column: pd.Series) -> pd.Series:
    """``column`` with every spelling of "no value" (NaN, NA, N/A, None, null, any case) made empty.

    Exported spreadsheets write missing cells in all these ways; taken literally, every row whose
    lesion_id says "NaN" would be one giant lesion, forced into a single split.
    """
    return column.where(~column.str.strip().str.lower().isin(MISSING_VALUES), "")


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def digest(*parts: bytes) -> str:
    """sha256 over the metadata files read (of one file: its plain sha256)."""
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_csv(data: bytes, label: str) -> pd.DataFrame:
    """A CSV as strings, header stripped and lower-cased, or a one-line BadInputError (empty, binary,
    unparseable, a column twice). The table may have no rows: see :func:`require_columns`."""
    if not data.strip():
        raise BadInputError(f"{label} is empty")
    if b"\x00" in data[:8192]:
        raise BadInputError(f"{label} is not a CSV file (it contains binary data)")
    try:
        # header=None: the header is checked here (pandas would silently rename a repeated column to
        # "dx.1", and would take the first column as an index when rows have one field too many).
        cells = pd.read_csv(io.StringIO(_text(data)), dtype=str, keep_default_na=False, skipinitialspace=True,
                            header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BadInputError(f"{label} is not a valid CSV file: {first_line(exc)}") from None
    header = [str(c).strip().lower() for c in cells.iloc[0]]
    table = cells.iloc[1:].fillna("").reset_index(drop=True)
    table.columns = header
    repeated = sorted({c for c in header if header.count(c) > 1 and c})
    if repeated:
        raise BadInputError(f"{label} has the column {', '.join(repr(c) for c in repeated)} more than once "
                            "(column names are compared ignoring case and spaces)")
    return table if table.empty else table.apply(lambda col: col.str.strip())


def require_columns(table: pd.DataFrame, label: str, required: Iterable[str], expected: str) -> None:
    """BadInputError when a required column is absent (``expected`` says what the file should hold)
    or the table has no rows."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise BadInputError(f"{label} lacks the column(s) {', '.join(missing)}; {expected}")
    if table.empty:
        raise BadInputError(f"{label} has a header but no rows")


def csv_header(path: Path) -> list[str]:
    """The first line of a CSV, stripped and lower-cased, for telling layouts apart ([] if unreadable)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(65536)
    except OSError:
        return []
    if b"\x00" in head:
        return []
    line = _text(head).splitlines()[0] if head.strip() else ""
    try:
        return [c.strip().lower() for c in next(csv.reader([line]), [])]
    except csv.Error:
        return []


def pick_columns(table: pd.DataFrame, given: dict[str, str] | None = None) -> dict[str, str]:
    """Which column of ``table`` holds each optional column: ``given`` first, else the first alias present."""
    chosen = dict(given or {})
    for target, aliases in COLUMN_ALIASES.items():
        if target not in chosen:
            found = next((a for a in aliases if a in table.columns), None)
            if found is not None:
                chosen[target] = found
    return chosen


def entries(folder: Path) -> list[Path]:
    """The folder's entries, sorted, or a one-line BadInputError (unreadable, a symlink loop...)."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise BadInputError(f"cannot list {folder}: {exc.strerror or first_line(exc)}") from None


def is_file(path: Path) -> bool:
    """A regular file (after symlinks) that can be stat'ed; anything else is not taken as input."""
    try:
        return path.is_file()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def top_csvs(folder: Path) -> list[Path]:
    """The CSV files directly in ``folder``, sorted."""
    return [p for p in entries(folder) if p.suffix.lower() == ".csv" and is_file(p)]


def subfolders(folder: Path) -> list[Path]:
    """The folder's visible sub-folders, sorted."""
    return [p for p in entries(folder) if not p.name.startswith(".") and is_dir(p)]


def _image_entry(path: Path, src: Path, files: dict[str, list[str]], problems: list[Problem]) -> None:
    """Record one entry with an image name: a readable file goes to ``files``, anything else is reported."""
    relative = path.relative_to(src).as_posix()
    if is_file(path):
        files.setdefault(path.stem, []).append(relative)
    else:
        problems.append(Problem(relative, path.stem, "unreadable",
                                "not a regular file (a folder, a broken link or a link loop)"))


def find_images(src: Path, folders: Iterable[Path]) -> tuple[dict[str, list[str]], list[Problem]]:
    """Image files directly in ``folders``: image_id (file stem) -> paths relative to ``src``.

    An entry with an image suffix that is not a readable regular file (a broken link, a link loop, a
    folder named ``x.jpg``) is reported and left out; a row naming it is then a missing_image.
    """
    files: dict[str, list[str]] = {}
    problems: list[Problem] = []
    for folder in folders:
        for path in entries(folder):
            if is_image_name(path.name):
                _image_entry(path, src, files, problems)
    return files, problems


def walk_images(src: Path, folder: Path) -> tuple[dict[str, list[str]], list[Problem]]:
    """Like :func:`find_images` for ``folder`` and every visible folder below it (links to folders
    are not followed, so a link loop cannot recurse)."""
    files: dict[str, list[str]] = {}
    problems: list[Problem] = []
    errors: list[OSError] = []
    for top, dirs, names in os.walk(folder, onerror=errors.append):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(top, d)))
        for name in sorted(names):
            if is_image_name(name):
                _image_entry(Path(top) / name, src, files, problems)
    if errors:
        raise BadInputError(f"cannot list {errors[0].filename}: {errors[0].strerror or first_line(errors[0])}")
    return files, problems
