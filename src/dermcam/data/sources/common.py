"""What every layout reader shares: the normalised table it returns, CSV parsing, finding image files.

A reader returns a :class:`SourceTable`: one row per image listed by the source, in the columns of
:data:`COLUMNS` (strings, empty when unknown), plus ``where`` (a place for messages, such as
``CSV line 7``). The cleaning that is not layout-specific (class names, duplicates, class choice,
missing ids, matching files) is :mod:`dermcam.data.clean`; hashing, splitting and the cache are
:mod:`dermcam.data.prepare`.

Readers see the source through a :class:`SourceFolder`, whose listings never leave it: an entry that
a symlink leads outside the source folder is reported (``unsafe_path``) and never read.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermcam.data.problems import Problem
from dermcam.errors import BadInputError, first_line
from dermcam.filekind import HEAD_BYTES, sniff

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
    blanked (all but image_id and source), and ``where``.

    ``source`` is not stripped: it is a file's real path (a class folder named ``" mel"`` is trimmed
    as a class name, ``" mel/x.jpg"`` must still name the file).
    """
    table = pd.DataFrame({c: (frame[c].astype(str) if c in frame.columns else "") for c in COLUMNS},
                         index=frame.index)
    table = table.apply(lambda col: col if col.name == "source" else col.str.strip())
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


# Byte-order marks, longest first (UTF-32 LE's begins with UTF-16 LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
         (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))


def _unicode_encoding(data: bytes) -> tuple[str, str] | None:
    """(codec, name) that a byte-order mark names, or UTF-16 without one (text that is mostly ASCII
    has a zero in every other byte); None otherwise."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            return codec, name
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    if len(sample) >= 4 and not even.count(0) and odd.count(0) > 0.4 * len(odd):
        return "utf-16-le", "UTF-16"
    if len(sample) >= 4 and not odd.count(0) and even.count(0) > 0.4 * len(even):
        return "utf-16-be", "UTF-16"
    return None


def decode_csv(data: bytes, label: str, head: bool = False) -> tuple[str, str | None]:
    """The text of a CSV file, and the encoding guessed when it is not Unicode (else None).

    Spreadsheets export in several encodings: UTF-8 (with or without a BOM), UTF-16 (Excel's "Unicode
    text") and, from Excel's plain "CSV", the Windows code page (cp1252 in Western Europe). A BOM or
    UTF-16's zero bytes are recognised; anything else is UTF-8 when it decodes as UTF-8, else it is read
    as Windows-1252 (Latin-1 for the five bytes cp1252 leaves undefined), and the caller reports the
    guess. A file with zero bytes that is not UTF-16 is refused in one line saying what it is.
    ``head``: ``data`` is the start of a file (a character may be cut off at the end).
    """
    errors = "replace" if head else "strict"
    unicode = _unicode_encoding(data)
    if unicode is not None:
        codec, name = unicode
        try:
            return data.decode(codec, errors), None
        except UnicodeDecodeError:
            raise BadInputError(f"{label} starts as {name} text but is not valid {name} (damaged?); "
                                "save it again as CSV UTF-8") from None
    if b"\x00" in data[:8192]:
        kind = sniff(data[:HEAD_BYTES])
        raise BadInputError(f"{label} is not a CSV file: it is {kind.description if kind else 'binary data'}")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if head and exc.start >= len(data) - 3:  # a character cut off by the read
            return data[:exc.start].decode("utf-8"), None
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "Latin-1"


def _delimiter(text: str) -> str:
    """``,`` unless the header line holds more ``;`` or tabs (Excel's CSV in locales with a decimal
    comma, and its UTF-16 "Unicode text", which is tab-separated)."""
    line = text.split("\n", 1)[0]
    return max(",;\t", key=line.count) if line.count(",") == 0 else ","


def parse_csv(data: bytes, label: str) -> tuple[pd.DataFrame, list[Problem]]:
    """A CSV as strings, header stripped and lower-cased, or a one-line BadInputError (empty, binary,
    unparseable, a column twice); and the problem to report when its encoding was guessed
    (:func:`decode_csv`). The table may have no rows: see :func:`require_columns`."""
    if not data.strip():
        raise BadInputError(f"{label} is empty")
    text, guessed = decode_csv(data, label)
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise BadInputError(f"{label} is empty")
    try:
        # header=None: the header is checked here (pandas would silently rename a repeated column to
        # "dx.1", and would take the first column as an index when rows have one field too many).
        cells = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True,
                            header=None, sep=_delimiter(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BadInputError(f"{label} is not a valid CSV file: {first_line(exc)}") from None
    header = [str(c).strip().lower() for c in cells.iloc[0]]
    table = cells.iloc[1:].fillna("").reset_index(drop=True)
    table.columns = header
    repeated = sorted({c for c in header if header.count(c) > 1 and c})
    if repeated:
        raise BadInputError(f"{label} has the column {', '.join(repr(c) for c in repeated)} more than once "
                            "(column names are compared ignoring case and spaces)")
    problems = [] if guessed is None else [
        Problem(label, "", "encoding", f"not UTF-8: read as {guessed} (Excel's Western European CSV); if "
                "accented names look wrong, save it as CSV UTF-8")]
    return (table if table.empty else table.apply(lambda col: col.str.strip())), problems


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
        text = decode_csv(head, path.name, head=True)[0].removeprefix("\ufeff")
    except (OSError, BadInputError):
        return []
    line = text.splitlines()[0] if text.strip() else ""
    try:
        return [c.strip().lower() for c in next(csv.reader([line], delimiter=_delimiter(line)), [])]
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


class SourceFolder:
    """A source folder as the layout readers see it: nothing outside it is listed, so nothing outside
    it is read.

    ``root`` is the folder's real path (``src`` itself, or the folder of a CSV file given as SRC), its
    symlinks resolved once, here. Every listing goes through :meth:`keep`: an entry that is a symlink
    is resolved and its real path compared with ``root``; one that leads outside (a file or folder
    linked from elsewhere, a class folder that is a link to another disk) is left out with everything
    below it and reported once as ``unsafe_path`` (:attr:`problems`). An entry that is not a link, in a
    folder inside the root, is inside by construction. Links that stay inside keep working; links to
    folders below a listed folder are not followed, so a link loop cannot recurse.
    """

    def __init__(self, src: Path) -> None:
        self.src = Path(os.path.realpath(src))  # the source as given: a folder, or a CSV file
        self.root = self.src.parent if is_file(self.src) else self.src
        self.problems: list[Problem] = []  # the entries left out, one unsafe_path each
        self._reported: set[str] = set()
        self._folders: dict[Path, str] = {}  # folder -> its real path, resolved once

    def outside(self, path: Path) -> str | None:
        """Where ``path`` really leads (every symlink resolved) when that is outside the root, else None.

        A path that is not itself a link leads where its folder leads, plus its name: folders are
        resolved once each, so checking every row of a 10,000-row CSV costs one lstat per row.
        """
        path = Path(path)
        if path.name in ("", ".", "..") or os.path.islink(path):
            real = os.path.realpath(path)
        else:
            if path.parent not in self._folders:
                self._folders[path.parent] = os.path.realpath(path.parent)
            real = os.path.join(self._folders[path.parent], path.name)
        root = str(self.root)
        return None if real == root or real.startswith(root.rstrip(os.sep) + os.sep) else real

    def relative(self, path: Path) -> str:
        """``path`` (found below the root) relative to it, as the index and problems.csv name it."""
        return path.relative_to(self.root).as_posix()

    def keep(self, path: Path) -> bool:
        """Whether a listed entry stays inside the root; an entry that leads outside is reported once."""
        if not os.path.islink(path):
            return True
        real = self.outside(path)
        if real is None:
            return True
        relative = self.relative(path)
        if relative not in self._reported:
            self._reported.add(relative)
            stem = path.stem if is_image_name(path.name) else ""
            self.problems.append(Problem(relative, stem, "unsafe_path",
                                         f"a symlink leading outside {self.root.name}/ (to {real}): not read"))
        return False

    def explained(self, error: BadInputError) -> BadInputError:
        """``error`` naming the entries left out, if any: a source whose metadata CSV or class folders are
        links to elsewhere should not fail with a bare "no CSV file"."""
        if not self.problems:
            return error
        names = ", ".join(p.file for p in self.problems[:3]) + (", ..." if len(self.problems) > 3 else "")
        return BadInputError(f"{error} (not read, symlinks leading outside {self.root.name}/: {names})")

    def entries(self, folder: Path, wanted: Callable[[Path], bool]) -> list[Path]:
        """The entries of ``folder`` (the root or a folder listed below it) that a reader wants (by name
        and type: nothing is read to decide) and that stay inside, sorted. Only wanted entries are
        reported when they lead outside: a stray link beside the data is none of prepare's business."""
        return [p for p in entries(folder) if wanted(p) and self.keep(p)]

    def top_csvs(self, folder: Path) -> list[Path]:
        """The CSV files directly in ``folder``, sorted."""
        return self.entries(folder, lambda p: p.suffix.lower() == ".csv" and is_file(p))

    def subfolders(self, folder: Path) -> list[Path]:
        """The folder's visible sub-folders, sorted."""
        return self.entries(folder, lambda p: not p.name.startswith(".") and is_dir(p))

    def images(self, folder: Path) -> list[Path]:
        """The entries of ``folder`` with an image name (regular files or not), sorted."""
        return self.entries(folder, lambda p: is_image_name(p.name))

    def _image_entry(self, path: Path, files: dict[str, list[str]], problems: list[Problem]) -> None:
        """Record one entry with an image name: a readable file goes to ``files``, anything else is reported."""
        relative = self.relative(path)
        if is_file(path):
            files.setdefault(path.stem, []).append(relative)
        else:
            problems.append(Problem(relative, path.stem, "unreadable",
                                    "not a regular file (a folder, a broken link or a link loop)"))

    def find_images(self, folders: Iterable[Path]) -> tuple[dict[str, list[str]], list[Problem]]:
        """Image files directly in ``folders``: image_id (file stem) -> paths relative to the root.

        An entry with an image suffix that is not a readable regular file (a broken link, a link loop, a
        folder named ``x.jpg``) is reported and left out; a row naming it is then a missing_image.
        """
        files: dict[str, list[str]] = {}
        problems: list[Problem] = []
        for folder in folders:
            for path in self.images(folder):
                self._image_entry(path, files, problems)
        return files, problems

    def walk_images(self, folder: Path) -> tuple[dict[str, list[str]], list[Problem]]:
        """Like :meth:`find_images` for ``folder`` and every visible folder below it (links to folders
        are not followed; one leading outside is reported)."""
        files: dict[str, list[str]] = {}
        problems: list[Problem] = []
        errors: list[OSError] = []
        for top, dirs, names in os.walk(folder, onerror=errors.append):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
            for link in links:
                self.keep(Path(top) / link)  # reported when it leads outside; never followed
            dirs[:] = [d for d in dirs if d not in links]
            for name in sorted(names):
                path = Path(top) / name
                if is_image_name(name) and self.keep(path):
                    self._image_entry(path, files, problems)
        if errors:
            raise BadInputError(f"cannot list {errors[0].filename}: {errors[0].strerror or first_line(errors[0])}")
        return files, problems
