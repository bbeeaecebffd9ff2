"""Readers of source layouts: one module per layout a data set can come in, and the front door.

:func:`read_source` detects the layout (or takes the one forced) and returns a
:class:`~dermcam.data.sources.common.SourceTable`: one row per image (``image_id``, ``source`` =
the image's path relative to the source folder or empty when found by id, ``dx``, ``lesion_id``,
``patient_id``, ``dataset``, ``dx_type``, ``age``, ``sex``, ``localization``) plus the
:class:`~dermcam.data.problems.Problem` list of everything it had to repair or skip. Everything after
that (class names and choice, duplicates, matching files, hashing, splitting, the cache) is shared
(:mod:`dermcam.data.clean`, :mod:`dermcam.data.prepare`), so a new layout is a new module here and
one entry in :data:`LAYOUTS`.

Readers get the source as a :class:`~dermcam.data.sources.common.SourceFolder` and find files only
through it, so no layout lists or reads anything that a symlink leads outside the source folder; what
it left out is reported here, once, for every layout (``unsafe_path``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dermcam.data.sources import csv, folders, ham10000, isic
from dermcam.data.sources.common import SourceFolder, SourceTable
from dermcam.errors import BadInputError

# Detection order: the most specific first (a folder of class folders may also hold a CSV).
LAYOUTS: dict[str, tuple[Callable[[SourceFolder], str | None], Callable[..., SourceTable]]] = {
    "ham10000": (ham10000.detect, ham10000.read),
    "isic": (isic.detect, isic.read),
    "csv": (csv.detect, csv.read),
    "folders": (folders.detect, folders.read),
}


COLUMN_OPTIONS = ("image", "label", "group", "lesion", "patient")  # --image-col ... (the csv layout)


def detect_layout(src: Path) -> tuple[str, str]:
    """The layout of ``src`` (a folder, or a CSV file) and why, or BadInputError naming what was looked for."""
    if src.is_file():
        return "csv", f"{src.name} is a CSV file"
    folder = SourceFolder(src)
    for name, (detect, _) in LAYOUTS.items():
        why = detect(folder)
        if why is not None:
            return name, why
    raise folder.explained(BadInputError(
        f"cannot tell the layout of {src}: expected HAM10000_metadata.csv, an ISIC ground-truth CSV, one CSV "
        "with image and label columns, or one folder per class (force one with --layout ham10000|isic|csv|folders)"))


def read_source(src: Path, layout: str | None = None, columns: dict[str, str] | None = None) -> SourceTable:
    """Read ``src`` in ``layout`` (None: detected). ``columns`` (keys of COLUMN_OPTIONS) are for the
    csv layout, which they select when no layout is given. Whatever a symlink leads outside ``src``
    (the CSV's folder, for a CSV file) is left out and listed first among ``scan_problems``."""
    columns = {k: v for k, v in (columns or {}).items() if v}
    unknown = sorted(set(columns) - set(COLUMN_OPTIONS))
    if unknown:
        raise BadInputError(f"unknown column option(s) {', '.join(unknown)}; choose from {', '.join(COLUMN_OPTIONS)}")
    if layout is not None and layout not in LAYOUTS:
        raise BadInputError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if columns and layout not in (None, "csv"):
        raise BadInputError(f"--{next(iter(columns))}-col is for --layout csv, not --layout {layout}")
    how = "--layout" if layout is not None else "--*-col options" if columns else "detected"
    if layout is None:
        layout = detect_layout(src)[0] if not columns else "csv"
    if src.is_file() and layout != "csv":
        raise BadInputError(f"{src} is a file: --layout {layout} reads a folder")
    folder = SourceFolder(src)
    try:
        source = csv.read(folder, columns) if layout == "csv" else LAYOUTS[layout][1](folder)
    except BadInputError as exc:
        raise folder.explained(exc) from None
    source.detail = f"{how}; {source.detail}"
    source.scan_problems = folder.problems + source.scan_problems
    return source
