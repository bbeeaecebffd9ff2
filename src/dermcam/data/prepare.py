"""Prepared data sets: a source folder in, a clean, split, pre-decoded data set out.

``prepare`` reads a source in any known layout (HAM10000 as Kaggle ships it, ISIC challenge CSVs,
one folder per class, a CSV of paths and labels: :mod:`dermcam.data.sources`), repairs or skips
every bad row and image (and reports each one), splits train/val/test by lesion (else patient, else
image, and near-duplicate photographs whatever their ids: :mod:`dermcam.data.near_duplicates`) so no
group sits on two sides, and decodes every image once into a single uint8 array that training
memory-maps, fingerprinting it in the same pass. An ``external`` set (evaluation only) puts every
image in test. The on-disk format is a contract with the training code (see docs/data.md)::

    <store root>/datasets/<name>/
        manifest.json   schema "dermcam.dataset/1": classes, label encoding, counts, audit, fingerprint,
                        layout, external, grouping, fingerprints, near_duplicates
        index.csv       one row per image; row i describes images[i] (with its split and group)
        images.npy      uint8 N x H x W x 3, loaded with np.load(mmap_mode="r")
        fingerprints.npy  float16 N x 12 x 192: each image's near-duplicate fingerprint
        duplicates.csv  the near-duplicate pairs found (and grouped), one row per pair
        problems.csv    every problem found in the source and what was done about it

Re-running ``prepare`` on unchanged input costs one pass of hashing: the content fingerprint matches
and the set is reused. When only some images changed, rows of unchanged images (same sha256) are
copied from the old cache (with their fingerprints) and only the rest is decoded.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermcam import __version__
from dermcam.data.cache import CACHE_FILE, FORMAT_VERSION, cache_entry, load_fingerprints, parallel_map, write_cache
from dermcam.data.classes import check_class_names
from dermcam.data.clean import clean_rows, match_files
from dermcam.data.dataset import SCHEMA
from dermcam.data.fingerprint import DEFAULT_THRESHOLD, fingerprint_entry
from dermcam.data.geometry import DEFAULT_CACHE_SIZE, parse_size
from dermcam.data.near_duplicates import DUPLICATES_FILE, audit, check_threshold, find_pairs, write_pairs
from dermcam.data.problems import PROBLEM_COLUMNS, Problem, problem_counts
from dermcam.data.sources import read_source
from dermcam.data.split import (
    DEFAULT_FRACTIONS,
    SPLITS,
    cap_per_class,
    group_keys,
    group_kinds,
    leakage_audit,
    split_by_lesion,
)
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.progress import Progress
from dermcam.store.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from dermcam.store.locks import store_lock
from dermcam.store.paths import datasets_dir

INDEX_COLUMNS = ("image_id", "lesion_id", "dx", "label", "split", "dx_type", "age", "sex", "localization",
                 "source", "sha256", "patient_id", "dataset", "group")


EXTERNAL_FRACTIONS = (0.0, 0.0, 1.0)  # an external (evaluation-only) set: every image in test


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


def _check_fractions(fractions: Sequence[float] | None, external: bool) -> tuple[float, float, float]:
    if external:
        if fractions is not None:
            raise BadInputError("--external puts every image in the test split: leave out --fractions")
        return EXTERNAL_FRACTIONS
    if fractions is None:
        return DEFAULT_FRACTIONS
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise BadInputError("fractions must be three non-negative numbers: train,val,test (e.g. 0.7,0.15,0.15)")
    if abs(sum(values) - 1.0) > 1e-6:
        raise BadInputError(f"fractions {','.join(map(str, values))} must sum to 1")
    if values[0] <= 0:
        raise BadInputError(f"fractions {','.join(map(str, values))} have no train part: a set only to evaluate "
                            "on is prepared with --external (every image in test, never trained on)")
    return values  # type: ignore[return-value]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_name(name: str) -> str:
    """The name becomes a folder in the store: fullmatch, since ``$`` would accept a trailing newline."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInputError(f"data set name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                            "and start with a letter or digit")
    return name


def _columns(**given: object) -> dict[str, str]:
    """The csv layout's column options that were given (strings), or BadInputError."""
    bad = [k for k, v in given.items() if v is not None and not isinstance(v, str)]
    if bad:
        raise BadInputError(f"--{bad[0]}-col must be a column name, not {given[bad[0]]!r}")
    return {k: v for k, v in given.items() if isinstance(v, str) and v.strip()}


def _check_count(value: object, option: str, minimum: int) -> int:
    """An integer option (not a bool, float or string) of at least ``minimum``, else BadInputError.

    The CLI checks these already; a Python caller passing ``seed=-1`` or ``max_per_class="5"`` gets
    the same one-line error instead of a failure deep inside numpy.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadInputError(f"{option} must be a whole number of at least {minimum}, not {value!r}")
    return int(value)


def _source_folder(src: Path | str) -> Path:
    """``src`` resolved, or a one-line error: NotFoundError when absent, BadInputError for a symlink
    loop, an unreadable path or a file."""
    path = Path(src).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise NotFoundError(f"{path.absolute()} does not exist") from None
    except (OSError, RuntimeError) as exc:  # Python < 3.13 raises RuntimeError for a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "symlink loop"
        raise BadInputError(f"{path.absolute()} cannot be opened as a folder: {reason}") from None
    if not resolved.is_dir() and not (resolved.is_file() and resolved.suffix.lower() == ".csv"):
        raise BadInputError(f"{resolved} is not a folder: give the data set's folder (or a CSV file of image "
                            "paths and labels)")
    return resolved


def default_name(src: Path) -> str:
    """The source folder's name (a CSV file's folder), made safe as a folder name in the store."""
    src = Path(src).resolve()
    folder = src.parent if src.is_file() else src
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-._")[:64] or "dataset"


def _fingerprint(metadata_sha: str, table: pd.DataFrame, problems: list[Problem], options: dict[str, Any]) -> str:
    """One hash over everything that shapes the output: metadata, used image bytes, options (with the
    layout and the classes chosen), code version, and the problems found so far (an unlisted image
    or a broken link changes problems.csv)."""
    payload = {"schema": SCHEMA, "format": FORMAT_VERSION, "fingerprints": fingerprint_entry(),
               "csv": metadata_sha, "options": options,
               "images": sorted(zip(table["source"], table["sha256"])),
               "problems": sorted(sorted(p.row().items()) for p in problems)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _summaries(table: pd.DataFrame, classes: list[str]) -> tuple[dict, dict]:
    counts = {s: {c: int(((table["split"] == s) & (table["dx"] == c)).sum()) for c in classes} for s in SPLITS}
    groups = table["group"]
    lesions = {s: int(groups[table["split"] == s].nunique()) for s in SPLITS}
    return counts, lesions


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

    classes: list[str] | None  # None: nv, bkl, mel when the source has them all, else every class found
    seed: int
    fractions: tuple[float, float, float]
    max_per_class: int | None
    size: tuple[int, int]
    layout: str | None  # None: detected
    external: bool
    columns: dict[str, str]  # the csv layout's column options
    near_duplicate_threshold: float  # 0: near-duplicates are not grouped

    def key(self) -> dict[str, Any]:
        return {"classes": self.classes, "seed": self.seed, "fractions": list(self.fractions),
                "max_per_class": self.max_per_class, "width": self.size[0], "height": self.size[1],
                "external": self.external, "columns": self.columns,
                "near_duplicate_threshold": self.near_duplicate_threshold}


@dataclass
class _Scan:
    """The source as prepare sees it before decoding: kept rows (with file and sha256) and problems."""

    table: pd.DataFrame
    problems: list[Problem]
    capped: int
    fingerprint: str
    root: Path  # the folder source paths are relative to
    layout: str
    layout_detail: str
    classes: list[str]
    classes_from: str
    other_classes: dict[str, int]

    @property
    def excluded(self) -> int:
        return sum(self.other_classes.values())


def _scan(src: Path, options: _Options, workers: int, progress: Progress) -> _Scan:
    """Read the source in its layout, clean it, match image files, apply the cap, hash, fingerprint."""
    source = read_source(src, options.layout, options.columns)
    rows = clean_rows(source.table, source.label, options.classes, source.lesion_ids)
    table, file_problems = match_files(rows.table, source.files, source.listed, source.root)
    problems = source.problems + rows.problems + source.scan_problems + file_problems
    capped = 0
    if options.max_per_class is not None:
        before = len(table)
        table = cap_per_class(table, options.max_per_class, options.seed)
        capped = before - len(table)
    hashes = parallel_map(_sha256_or_none, [source.root / s for s in table["source"]], workers, progress,
                          "Hashing images")
    table = table.assign(sha256=hashes)
    unreadable = table["sha256"].isna()
    problems += [Problem(r.source, r.image_id, "unreadable", "cannot read the file")
                 for r in table[unreadable].itertuples()]
    table = table[~unreadable].reset_index(drop=True)
    key = {**options.key(), "classes": rows.classes, "classes_from": rows.classes_from, "layout": source.layout,
           "layout_detail": source.detail, "other_classes": rows.other_classes}
    fingerprint = _fingerprint(source.digest, table, problems, key)
    return _Scan(table, problems, capped, fingerprint, source.root, source.layout, source.detail, rows.classes,
                 rows.classes_from, rows.other_classes)


def _sha256_or_none(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (permissions, removed since it was listed)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _manifest(name: str, options: _Options, scan: _Scan, table: pd.DataFrame,
              problems: list[Problem], near_duplicates: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the finished set (the format contract, see the module doc)."""
    counts, lesions = _summaries(table, scan.classes)
    return {
        "schema": SCHEMA, "name": name, "source": str(scan.root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dermcam_version": __version__, "classes": scan.classes,
        "label_encoding": {c: i for i, c in enumerate(scan.classes)}, "fingerprint": scan.fingerprint,
        "cache": cache_entry(options.size), "fingerprints": fingerprint_entry(),
        "seed": options.seed, "fractions": list(options.fractions), "max_per_class": options.max_per_class,
        "counts": counts, "lesions": lesions, "leakage": leakage_audit(table["group"], table["split"]),
        "problems": problem_counts(problems),
        "layout": scan.layout, "layout_detail": scan.layout_detail, "external": options.external,
        "grouping": group_kinds(table["group"]), "classes_from": scan.classes_from,
        "other_classes": scan.other_classes, "near_duplicates": near_duplicates,
    }


def _build(build: Path, target: Path, options: _Options, scan: _Scan, workers: int,
           progress: Progress) -> tuple[dict[str, Any], list[Problem], int, int]:
    """Write the whole set into the ``build`` folder. Returns manifest, problems, reused, decoded.

    Near-duplicate pairs join the groups before the split (one transitive closure with the lesion and
    patient ids), so a photograph filed under two lesion ids ends on one side."""
    cache = write_cache(build / CACHE_FILE, scan.table, scan.root, target, options.size, workers, progress)
    problems = scan.problems + cache.problems
    table = scan.table[cache.ok].reset_index(drop=True)
    _check_usable(table, scan.classes)
    progress.start("Searching near-duplicates", total=1)
    pairs, distances, within = find_pairs(cache.fingerprints, options.near_duplicate_threshold)
    progress.advance()
    progress.finish()
    table["group"] = group_keys(table, pairs)
    table["split"] = split_by_lesion(table["group"], table["dx"], options.fractions, options.seed)
    table["label"] = table["dx"].map({c: i for i, c in enumerate(scan.classes)}).astype(int)
    near = audit(table, pairs, distances, options.near_duplicate_threshold, within)
    write_pairs(build, near)
    manifest = _manifest(target.name, options, scan, table, problems, near.summary)
    atomic_write_bytes(build / "index.csv", _frame_bytes(table[list(INDEX_COLUMNS)]))
    atomic_write_bytes(build / "problems.csv",
                       _frame_bytes(pd.DataFrame([p.row() for p in problems], columns=list(PROBLEM_COLUMNS))))
    atomic_write_json(build / "manifest.json", manifest)
    return manifest, problems, cache.reused, int(cache.ok.sum()) - cache.reused


def prepare(src: Path, *, name: str | None = None, classes: Sequence[str] | None = None, seed: int = 0,
            fractions: Sequence[float] | None = None, max_per_class: int | None = None,
            cache_size: tuple[int, int] | str = DEFAULT_CACHE_SIZE, workers: int | None = None,
            progress: Progress | None = None, root: Path | None = None, layout: str | None = None,
            external: bool = False, image_col: str | None = None, label_col: str | None = None,
            group_col: str | None = None, lesion_col: str | None = None,
            patient_col: str | None = None, near_duplicate_threshold: float = DEFAULT_THRESHOLD) -> PrepareReport:
    """Prepare the source ``src`` (a folder, or a CSV file) as data set ``name`` in the store.

    ``classes`` None: nv, bkl and mel when the source has all three, else every class it has.
    ``fractions`` None: 0.7, 0.15, 0.15. ``layout`` None: detected (``ham10000``, ``isic``, ``csv``,
    ``folders``). ``external``: an evaluation-only set, every image in test (no ``fractions``).
    ``image_col`` ... ``patient_col``: the csv layout's columns (``group_col`` is ``lesion_col``), else
    recognised by name; giving one selects the csv layout. ``near_duplicate_threshold``: images whose
    fingerprints are closer than this share a group (0: not grouped; the fingerprints are kept anyway).

    Raises BadInputError (an unusable source or option) and NotFoundError (no ``src``); on any error
    the store is left exactly as it was: the set is built in a hidden folder and renamed into place.
    """
    started = time.monotonic()
    progress = progress or Progress()
    workers = _check_count(workers, "--workers", 1) if workers is not None else min(4, os.cpu_count() or 1)
    src = _source_folder(src)
    if max_per_class is not None:
        max_per_class = _check_count(max_per_class, "--max-per-class", 1)
    options = _Options(None if classes is None else check_class_names(classes), _check_count(seed, "--seed", 0),
                       _check_fractions(fractions, bool(external)), max_per_class,
                       parse_size(cache_size, "--cache-size"), layout, bool(external),
                       _columns(image=image_col, label=label_col, group=group_col, lesion=lesion_col,
                                patient=patient_col), check_threshold(near_duplicate_threshold))
    name = _check_name(name) if name is not None else default_name(src)

    scan = _scan(src, options, workers, progress)
    target = datasets_dir(root) / name
    current = _reuse_if_current(target, scan, started)
    if current is not None:
        return current
    datasets_dir(root).mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=datasets_dir(root), prefix=f".{name}.", suffix=".build"))
    try:
        manifest, problems, reused, decoded = _build(build, target, options, scan, workers, progress)
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
        if manifest.get("fingerprint") != scan.fingerprint or not (target / DUPLICATES_FILE).is_file():
            return None
        total = sum(sum(c.values()) for c in manifest.get("counts", {}).values())
        load_fingerprints(target, manifest, total)  # a damaged fingerprints.npy: rebuilt
    except (OSError, ValueError, AttributeError, NotFoundError, CorruptError):
        return None
    if len(images) != total:
        return None
    listed = [Problem(r.file, r.image_id, r.kind, r.detail) for r in problems.itertuples()]
    return PrepareReport(name=target.name, path=target, manifest=manifest, up_to_date=True, reused=total,
                         decoded=0, excluded=scan.excluded, capped=scan.capped,
                         seconds=time.monotonic() - started, problems=listed)
