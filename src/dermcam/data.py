"""Prepared data sets: a HAM10000 folder in, a clean, split, pre-decoded data set out.

``prepare`` reads a HAM10000 folder as Kaggle ships it, repairs or skips every bad row and image
(and reports each one), splits train/val/test by lesion so no lesion sits on two sides, and decodes
every image once into a single uint8 array that training memory-maps. The on-disk format is a
contract with the training code (see docs/data.md)::

    <store root>/datasets/<name>/
        manifest.json   schema "dermcam.dataset/1": classes, label encoding, counts, audit, fingerprint
        index.csv       one row per image; row i describes images[i]
        images.npy      uint8 N x H x W x 3, loaded with np.load(mmap_mode="r")
        problems.csv    every problem found in the source and what was done about it

Re-running ``prepare`` on unchanged input costs one pass of hashing: the content fingerprint matches
and the set is reused. When only some images changed, rows of unchanged images (same sha256) are
copied from the old cache and only the rest is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from dermcam import __version__
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.images import ImageDecodeError, conversion_note_of, decode_image
from dermcam.progress import Progress
from dermcam.store import (atomic_path, atomic_write_bytes, atomic_write_json, datasets_dir, read_json,
                           store_lock)

SCHEMA = "dermcam.dataset/1"
CLASS_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DEFAULT_CLASSES = ("nv", "bkl", "mel")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_CACHE_SIZE = (256, 192)  # width x height, HAM10000's 4:3
SPLITS = ("train", "val", "test")
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
REQUIRED_COLUMNS = ("image_id", "dx")
INDEX_COLUMNS = ("image_id", "lesion_id", "dx", "label", "split", "dx_type", "age", "sex", "localization",
                 "source", "sha256")
PROBLEM_COLUMNS = ("file", "image_id", "kind", "action", "detail")
IMAGE_FOLDERS = ("ham10000_images_part_1", "ham10000_images_part_2", "images")  # matched case-insensitively
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
CACHE_FILE = "images.npy"
# Bump when decoding, resizing or splitting changes, so old sets stop matching the fingerprint.
FORMAT_VERSION = 1

# Every kind of problem prepare reports, and what it does about it.
PROBLEM_ACTIONS: dict[str, str] = {
    "missing_column": "fixed",  # optional column absent: filled with empty values
    "missing_image_id": "skipped",
    "unknown_dx": "skipped",  # dx not one of the seven HAM10000 codes
    "listed_twice": "fixed",  # identical rows: kept once
    "duplicate_image_id": "skipped",  # rows with one image_id that disagree: label is ambiguous
    "missing_lesion_id": "fixed",  # treated as a lesion of its own
    "missing_image": "skipped",
    "duplicate_file": "fixed",  # identical copies in two image folders: first one used
    "conflicting_files": "skipped",  # different files with the same image_id
    "unlisted_image": "skipped",  # an image file no CSV row names
    "unreadable": "skipped",
    "truncated": "skipped",
    "converted": "fixed",  # grayscale, RGBA, CMYK, palette, 16-bit...: converted to 8-bit RGB
}


@dataclass(frozen=True)
class Problem:
    """One problem found in the source; the full list goes to ``problems.csv``."""

    file: str
    image_id: str
    kind: str
    detail: str

    @property
    def action(self) -> str:
        return PROBLEM_ACTIONS[self.kind]

    def row(self) -> dict[str, str]:
        return {"file": self.file, "image_id": self.image_id, "kind": self.kind, "action": self.action,
                "detail": self.detail}


@dataclass
class PrepareReport:
    """What ``prepare`` did: the manifest written plus how the work went."""

    name: str
    path: Path
    manifest: dict[str, Any]
    up_to_date: bool  # the set already matched the fingerprint and was reused as is
    reused: int  # cache rows copied from the previous version of the set
    decoded: int  # images decoded in this run
    excluded: int  # rows of classes not chosen
    capped: int  # rows left out by --max-per-class
    seconds: float
    problems: list[Problem] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(sum(c.values()) for c in self.manifest["counts"].values())

    @property
    def cache_bytes(self) -> int:
        return (self.path / CACHE_FILE).stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "up_to_date": self.up_to_date,
                "images": self.images, "reused": self.reused, "decoded": self.decoded,
                "excluded": self.excluded, "capped": self.capped, "cache_bytes": self.cache_bytes,
                "seconds": round(self.seconds, 3), "problems_file": str(self.path / "problems.csv"),
                "manifest": self.manifest}


@dataclass
class PreparedDataset:
    """A prepared set as training sees it: the index and the memory-mapped image cache."""

    name: str
    path: Path
    manifest: dict[str, Any]
    classes: list[str]
    index: pd.DataFrame
    images: np.ndarray  # memory-mapped uint8 NHWC

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Row indices into ``images`` and their integer labels for ``train``, ``val`` or ``test``."""
        if which not in SPLITS:
            raise BadInputError(f"unknown split '{which}'; choose from {', '.join(SPLITS)}")
        rows = np.flatnonzero(self.index["split"].to_numpy() == which)
        return rows, self.index["label"].to_numpy(dtype=np.int64)[rows]


# --------------------------------------------------------------------------- validation of options


def check_classes(classes: Iterable[str]) -> list[str]:
    """The chosen class codes in label order (alphabetical), or BadInputError."""
    chosen = sorted({c.strip().lower() for c in classes if c.strip()})
    unknown = [c for c in chosen if c not in CLASS_CODES]
    if unknown:
        raise BadInputError(f"unknown class code(s) {', '.join(unknown)}; choose from {', '.join(CLASS_CODES)}")
    if len(chosen) < 2:
        raise BadInputError("choose at least two classes (for example nv,bkl,mel)")
    return chosen


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise BadInputError("fractions must be three non-negative numbers: train,val,test (e.g. 0.7,0.15,0.15)")
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise BadInputError(f"fractions {','.join(map(str, values))} must sum to 1 with a non-zero train part")
    return values  # type: ignore[return-value]


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(8 <= int(s) <= 4096 for s in size):
        raise BadInputError(f"cache size {'x'.join(map(str, size))} must be WIDTHxHEIGHT, each 8 to 4096 pixels")
    return int(size[0]), int(size[1])


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInputError(f"data set name '{name}' must be 1-64 letters, digits, '.', '_' or '-' "
                            "and start with a letter or digit")
    return name


def default_name(src: Path) -> str:
    """The source folder's name, made safe as a folder name in the store."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(src).resolve().name).strip("-._")[:64] or "dataset"


# --------------------------------------------------------------------------- reading the source


def find_metadata_csv(src: Path) -> Path:
    """``HAM10000_metadata.csv`` (any case) in ``src``, else the folder's only CSV, else BadInputError."""
    csvs = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
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
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadInputError(f"{label} is not a valid CSV file: {str(exc).strip().splitlines()[0]}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
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
    table["dx"] = table["dx"].str.lower()
    table["line"] = np.arange(len(table)) + 2  # line number in the CSV, for messages
    return table, problems


def find_images(src: Path) -> dict[str, list[str]]:
    """Image files in the known image folders: image_id (file stem) -> paths relative to ``src``."""
    folders = sorted(p for p in src.iterdir() if p.is_dir() and p.name.lower() in IMAGE_FOLDERS)
    if not folders:
        raise BadInputError(f"{src} has no image folder: expected HAM10000_images_part_1/, "
                            "HAM10000_images_part_2/ or images/")
    files: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                files.setdefault(path.stem, []).append(path.relative_to(src).as_posix())
    return files


def _clean_rows(table: pd.DataFrame, label: str, classes: list[str]) -> tuple[pd.DataFrame, list[Problem], int]:
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


def _match_files(table: pd.DataFrame, files: dict[str, list[str]], all_ids: set[str],
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
        elif len({file_sha256(src / p) for p in paths}) == 1:
            problems.append(Problem(paths[0], row.image_id, "duplicate_file",
                                    f"identical copies {', '.join(paths)}: using the first"))
            sources.append(paths[0])
        else:
            problems.append(Problem(paths[0], row.image_id, "conflicting_files",
                                    f"different files {', '.join(paths)} share this image_id"))
            sources.append(None)
    table = table.assign(source=sources)
    return table[table["source"].notna()], problems


# --------------------------------------------------------------------------- splitting


def group_keys(table: pd.DataFrame) -> pd.Series:
    """The grouping key of each row: its lesion_id, or the image itself when lesion_id is empty."""
    return table["lesion_id"].where(table["lesion_id"] != "", "image:" + table["image_id"])


def _lesion_table(groups: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    """One row per lesion: its image count and majority label."""
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
    for _, members in _lesion_table(groups, labels).groupby("label", sort=True):
        members = members.iloc[rng.permutation(len(members))]
        target = wanted * members["size"].sum()
        filled = np.zeros(len(SPLITS))
        for name, size in members["size"].items():
            behind = np.where(target > 0, filled / np.where(target > 0, target, 1), np.inf)
            split = int(np.argmin(behind))
            assignment[name] = SPLITS[split]
            filled[split] += size
    return np.array([assignment[g] for g in groups], dtype=object)


def leakage_audit(groups: Sequence[str], splits: Sequence[str]) -> dict[str, int]:
    """How many groups (lesions) each pair of splits shares; a correct split has zeros everywhere."""
    frame = pd.DataFrame({"group": list(groups), "split": list(splits)})
    members = {s: set(frame.loc[frame["split"] == s, "group"]) for s in SPLITS}
    return {f"{a}/{b}": len(members[a] & members[b])
            for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]}


def _cap_per_class(table: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` images per class, taking whole lesions in a seeded random order."""
    rng = np.random.default_rng(seed)
    groups = group_keys(table)
    keep: set[str] = set()
    for _, lesions in _lesion_table(groups, table["dx"]).groupby("label", sort=True):
        lesions = lesions.iloc[rng.permutation(len(lesions))]
        total = 0
        for name, size in lesions["size"].items():
            if total + size <= max_per_class:
                keep.add(name)
                total += size
    return table[groups.isin(keep)]


# --------------------------------------------------------------------------- hashing and the cache

T = TypeVar("T")
R = TypeVar("R")


def _parallel(func: Callable[[T], R], items: Sequence[T], workers: int, progress: Progress,
              description: str) -> list[R]:
    """``[func(x) for x in items]`` on a thread pool (Pillow and hashlib release the GIL)."""
    progress.start(description, total=len(items))
    results: list[R] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(func, items):
            results.append(result)
            progress.advance()
    progress.finish()
    return results


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(csv_sha: str, table: pd.DataFrame, unlisted: list[str], options: dict[str, Any]) -> str:
    """One hash over everything that shapes the output: CSV, used image bytes, options, code version."""
    payload = {"schema": SCHEMA, "format": FORMAT_VERSION, "csv": csv_sha, "options": options,
               "images": sorted(zip(table["source"], table["sha256"])), "unlisted": sorted(unlisted)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _previous_rows(target: Path, size: tuple[int, int]) -> tuple[np.ndarray | None, dict[str, int]]:
    """The previous cache of this set (when its size matches) and its rows by image sha256."""
    try:
        manifest = read_json(target / "manifest.json")
        cache = manifest["cache"]
        if (cache["width"], cache["height"]) != size:
            return None, {}
        index = pd.read_csv(target / "index.csv", dtype=str, keep_default_na=False)
        images = np.load(target / CACHE_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None, {}
    if images.shape != (len(index), size[1], size[0], 3):
        return None, {}
    return images, {sha: i for i, sha in enumerate(index["sha256"])}


def _fill_cache(cache: np.ndarray, table: pd.DataFrame, src: Path, old: np.ndarray | None,
                old_rows: dict[str, int], size: tuple[int, int], workers: int,
                progress: Progress) -> tuple[np.ndarray, list[Problem], int]:
    """Write every row's image into ``cache``: copied from ``old`` when its sha256 is known there,
    decoded otherwise. Returns which rows succeeded, the problems found, and the rows reused."""
    ok = np.ones(len(table), dtype=bool)
    problems: list[Problem] = []
    todo: list[int] = []
    for i, (source, sha, image_id) in enumerate(zip(table["source"], table["sha256"], table["image_id"])):
        if old is not None and sha in old_rows:
            cache[i] = old[old_rows[sha]]
            note = conversion_note_of(src / source)  # report the conversion again
            if note:
                problems.append(Problem(source, image_id, "converted", note))
        else:
            todo.append(i)

    sources, image_ids = list(table["source"]), list(table["image_id"])

    def decode(i: int) -> tuple[int, str | None, ImageDecodeError | None]:
        try:
            cache[i], note = decode_image(src / sources[i], size)
            return i, note, None
        except ImageDecodeError as exc:
            return i, None, exc

    for i, note, error in _parallel(decode, todo, workers, progress, "Decoding images"):
        source, image_id = sources[i], image_ids[i]
        if error is not None:
            ok[i] = False
            problems.append(Problem(source, image_id, error.kind, str(error)))
        elif note:
            problems.append(Problem(source, image_id, "converted", note))
    return ok, problems, len(table) - len(todo)


def _write_cache(path: Path, table: pd.DataFrame, src: Path, target: Path, size: tuple[int, int],
                 workers: int, progress: Progress) -> tuple[np.ndarray, list[Problem], int]:
    """Build ``images.npy`` at ``path`` for ``table``'s rows; rows that fail to decode are dropped."""
    old, old_rows = _previous_rows(target, size)
    with atomic_path(path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(table), size[1], size[0], 3))
        ok, problems, reused = _fill_cache(cache, table, src, old, old_rows, size, workers, progress)
        cache.flush()
        del cache
    if not ok.all():
        _compact(path, np.flatnonzero(ok))
    return ok, problems, reused


def _compact(path: Path, keep: np.ndarray, chunk: int = 256) -> None:
    """Rewrite the cache at ``path`` with only the rows ``keep`` (in chunks: never all in memory)."""
    full = np.load(path, mmap_mode="r", allow_pickle=False)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *full.shape[1:]))
        for start in range(0, len(keep), chunk):
            out[start:start + chunk] = full[keep[start:start + chunk]]
        out.flush()
        del out, full


# --------------------------------------------------------------------------- prepare


def _summaries(table: pd.DataFrame, classes: list[str]) -> tuple[dict, dict]:
    counts = {s: {c: int(((table["split"] == s) & (table["dx"] == c)).sum()) for c in classes} for s in SPLITS}
    groups = group_keys(table)
    lesions = {s: int(groups[table["split"] == s].nunique()) for s in SPLITS}
    return counts, lesions


def _problem_counts(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return {k: counts[k] for k in PROBLEM_ACTIONS if k in counts}


def _frame_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n").encode()


def _swap_into_place(build: Path, target: Path, root: Path | None) -> None:
    """Replace ``target`` with the finished ``build`` folder; the old set is removed only after."""
    with store_lock("datasets", root=root):
        retired = None
        if target.exists():
            retired = target.with_name(f".{target.name}.{os.getpid()}.{time.time_ns()}.old")
            os.replace(target, retired)
        os.replace(build, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


@dataclass
class _Options:
    """Validated prepare options; ``key()`` is the part that shapes the output (and the fingerprint)."""

    classes: list[str]
    seed: int
    fractions: tuple[float, float, float]
    max_per_class: int | None
    size: tuple[int, int]

    def key(self) -> dict[str, Any]:
        return {"classes": self.classes, "seed": self.seed, "fractions": list(self.fractions),
                "max_per_class": self.max_per_class, "width": self.size[0], "height": self.size[1]}


@dataclass
class _Scan:
    """The source as prepare sees it before decoding: kept rows (with file and sha256) and problems."""

    table: pd.DataFrame
    problems: list[Problem]
    excluded: int
    capped: int
    fingerprint: str


def _scan(src: Path, options: _Options, workers: int, progress: Progress) -> _Scan:
    """Read and clean the metadata, match image files, apply the cap, hash, fingerprint."""
    csv_path = find_metadata_csv(src)
    csv_bytes = csv_path.read_bytes()
    raw, problems = read_metadata(csv_bytes, csv_path.name)
    files = find_images(src)
    table, row_problems, excluded = _clean_rows(raw, csv_path.name, options.classes)
    table, file_problems = _match_files(table, files, set(raw["image_id"]), src)
    problems += row_problems + file_problems
    capped = 0
    if options.max_per_class is not None:
        before = len(table)
        table = _cap_per_class(table, options.max_per_class, options.seed)
        capped = before - len(table)
    hashes = _parallel(file_sha256, [src / s for s in table["source"]], workers, progress, "Hashing images")
    table = table.assign(sha256=hashes).reset_index(drop=True)
    unlisted = [p.file for p in problems if p.kind == "unlisted_image"]
    fingerprint = _fingerprint(hashlib.sha256(csv_bytes).hexdigest(), table, unlisted, options.key())
    return _Scan(table, problems, excluded, capped, fingerprint)


def _manifest(name: str, src: Path, options: _Options, scan: _Scan, table: pd.DataFrame,
              problems: list[Problem]) -> dict[str, Any]:
    """The manifest of the finished set (the format contract, see the module doc)."""
    counts, lesions = _summaries(table, options.classes)
    return {
        "schema": SCHEMA, "name": name, "source": str(src),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dermcam_version": __version__, "classes": options.classes,
        "label_encoding": {c: i for i, c in enumerate(options.classes)}, "fingerprint": scan.fingerprint,
        "cache": {"file": CACHE_FILE, "width": options.size[0], "height": options.size[1], "dtype": "uint8",
                  "layout": "NHWC"},
        "seed": options.seed, "fractions": list(options.fractions), "max_per_class": options.max_per_class,
        "counts": counts, "lesions": lesions, "leakage": leakage_audit(group_keys(table), table["split"]),
        "problems": _problem_counts(problems),
    }


def _build(build: Path, target: Path, src: Path, options: _Options, scan: _Scan, workers: int,
           progress: Progress) -> tuple[dict[str, Any], list[Problem], int, int]:
    """Write the whole set into the ``build`` folder. Returns manifest, problems, reused, decoded."""
    ok, image_problems, reused = _write_cache(build / CACHE_FILE, scan.table, src, target, options.size,
                                              workers, progress)
    problems = scan.problems + image_problems
    table = scan.table[ok].reset_index(drop=True)
    _check_usable(table, options.classes)
    table["split"] = split_by_lesion(group_keys(table), table["dx"], options.fractions, options.seed)
    table["label"] = table["dx"].map({c: i for i, c in enumerate(options.classes)}).astype(int)
    manifest = _manifest(target.name, src, options, scan, table, problems)
    atomic_write_bytes(build / "index.csv", _frame_bytes(table[list(INDEX_COLUMNS)]))
    atomic_write_bytes(build / "problems.csv",
                       _frame_bytes(pd.DataFrame([p.row() for p in problems], columns=list(PROBLEM_COLUMNS))))
    atomic_write_json(build / "manifest.json", manifest)
    return manifest, problems, reused, int(ok.sum()) - reused


def prepare(src: Path, *, name: str | None = None, classes: Sequence[str] = DEFAULT_CLASSES, seed: int = 0,
            fractions: Sequence[float] = DEFAULT_FRACTIONS, max_per_class: int | None = None,
            cache_size: tuple[int, int] = DEFAULT_CACHE_SIZE, workers: int | None = None,
            progress: Progress | None = None, root: Path | None = None) -> PrepareReport:
    """Prepare the HAM10000 folder ``src`` as data set ``name`` in the store (see the module doc).

    Raises BadInputError (an unusable source or option) and NotFoundError (no ``src``); on any error
    the store is left exactly as it was: the set is built in a hidden folder and renamed into place.
    """
    started = time.monotonic()
    progress = progress or Progress()
    workers = workers or min(4, os.cpu_count() or 1)
    src = Path(src).expanduser().resolve()
    if not src.exists():
        raise NotFoundError(f"{src} does not exist")
    if not src.is_dir():
        raise BadInputError(f"{src} is not a folder: give the HAM10000 folder holding HAM10000_metadata.csv")
    if max_per_class is not None and max_per_class < 1:
        raise BadInputError("--max-per-class must be at least 1")
    options = _Options(check_classes(classes), seed, _check_fractions(fractions), max_per_class,
                       _check_size(cache_size))
    name = _check_name(name) if name else default_name(src)

    scan = _scan(src, options, workers, progress)
    target = datasets_dir(root) / name
    current = _reuse_if_current(target, scan, started)
    if current is not None:
        return current
    datasets_dir(root).mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=datasets_dir(root), prefix=f".{name}.", suffix=".build"))
    try:
        manifest, problems, reused, decoded = _build(build, target, src, options, scan, workers, progress)
        _swap_into_place(build, target, root)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return PrepareReport(name=name, path=target, manifest=manifest, up_to_date=False, reused=reused,
                         decoded=decoded, excluded=scan.excluded, capped=scan.capped,
                         seconds=time.monotonic() - started, problems=problems)


def _check_usable(table: pd.DataFrame, classes: list[str]) -> None:
    """A set without images of every chosen class cannot train a classifier: refuse it."""
    present = set(table["dx"])
    empty = [c for c in classes if c not in present]
    if empty:
        raise BadInputError(f"no usable images of class {', '.join(empty)} (see the problems reported above "
                            "or choose other --classes)")


def _reuse_if_current(target: Path, scan: _Scan, started: float) -> PrepareReport | None:
    """The existing set as a report, when it was built from exactly this input and is intact."""
    try:
        manifest = read_json(target / "manifest.json")
        images = np.load(target / CACHE_FILE, mmap_mode="r", allow_pickle=False)
        problems = pd.read_csv(target / "problems.csv", dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    total = sum(sum(c.values()) for c in manifest.get("counts", {}).values())
    if manifest.get("fingerprint") != scan.fingerprint or len(images) != total:
        return None
    listed = [Problem(r.file, r.image_id, r.kind, r.detail) for r in problems.itertuples()]
    return PrepareReport(name=target.name, path=target, manifest=manifest, up_to_date=True, reused=total,
                         decoded=0, excluded=scan.excluded, capped=scan.capped,
                         seconds=time.monotonic() - started, problems=listed)


# --------------------------------------------------------------------------- reading prepared sets


def list_prepared(root: Path | None = None) -> list[dict[str, Any]]:
    """Manifests of every prepared set (plus its ``path``), sorted by name; unreadable ones skipped."""
    folder = datasets_dir(root)
    if not folder.is_dir():
        return []
    manifests = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path / "manifest.json").is_file():
            continue
        try:
            manifest = read_json(path / "manifest.json")
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA:
            manifests.append({**manifest, "path": str(path)})
    return manifests


def load_prepared(name: str | None = None, root: Path | None = None) -> PreparedDataset:
    """Open a prepared set: ``name``, or with None the only / most recently prepared one."""
    with store_lock("datasets", shared=True, root=root):
        available = list_prepared(root)
        if name is None:
            if not available:
                raise NotFoundError(f"no prepared data set in {datasets_dir(root)}; run: dermcam prepare SRC")
            name = max(available, key=lambda m: str(m.get("created", "")))["name"]
        path = datasets_dir(root) / str(name)
        if not (path / "manifest.json").is_file():
            names = ", ".join(m["name"] for m in available) or "none; run: dermcam prepare SRC"
            raise NotFoundError(f"no prepared data set named '{name}' (available: {names})")
        return _open(path)


def _open(path: Path) -> PreparedDataset:
    try:
        manifest = read_json(path / "manifest.json")
        index = pd.read_csv(path / "index.csv", dtype=str, keep_default_na=False)
        index["label"] = index["label"].astype(np.int64)
        images = np.load(path / manifest["cache"]["file"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptError(f"data set at {path} is damaged ({exc}); prepare it again") from None
    cache = manifest["cache"]
    expected = (len(index), cache["height"], cache["width"], 3)
    if manifest.get("schema") != SCHEMA or images.shape != expected or images.dtype != np.uint8:
        raise CorruptError(f"data set at {path} is damaged: images.npy is {images.shape} {images.dtype}, "
                           f"expected {expected} uint8; prepare it again")
    return PreparedDataset(manifest["name"], path, manifest, list(manifest["classes"]), index, images)



__all__ = ["CLASS_CODES", "PROBLEM_ACTIONS", "Problem", "PrepareReport", "PreparedDataset",
           "prepare", "load_prepared", "list_prepared", "split_by_lesion", "leakage_audit",
           "check_classes", "default_name"]
