"""Prepared data sets: a source folder in, a clean, split, pre-decoded data set out.

``prepare`` reads a source in any known layout (HAM10000 as Kaggle ships it, ISIC challenge CSVs,
one folder per class, a CSV of paths and labels: :mod:`dermcam.data.sources`), repairs or skips
every bad row and image (and reports each one), splits train/val/test by lesion (else patient, else
image, and near-duplicate photographs whatever their ids: :mod:`dermcam.data.near_duplicates`) so no
group sits on two sides, and decodes every image once into a single uint8 array that training
memory-maps, fingerprinting it in the same pass. An ``external`` set (evaluation only) puts every
image in test. Several sources make one set: each row's ``dataset`` names its source, and an image found
in two sources (the same file, or a near-duplicate) counts once (docs/data.md, "Several sources"). The on-disk format is a contract with the training code (see docs/data.md)::

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
from dermcam.data.cache import keep_rows
from dermcam.data.classes import check_class_names, choose_classes
from dermcam.data.clean import drop_bad_rows, keep_classes, match_files
from dermcam.data.dataset import SCHEMA
from dermcam.data.fingerprint import DEFAULT_THRESHOLD, fingerprint_entry
from dermcam.data.geometry import DEFAULT_CACHE_SIZE, parse_size
from dermcam.data.near_duplicates import DUPLICATES_FILE, audit, check_threshold, find_pairs, write_pairs
from dermcam.data.problems import PROBLEM_COLUMNS, Problem, problem_counts
from dermcam.data.sources import read_source
from dermcam.data.sources.common import SourceTable, digest
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
# A set of several sources adds the row's own ``dataset`` value (HAM10000's vidir_modern...), since its
# ``dataset`` column names the source: one subgroup per source in evaluate's table.
SEVERAL_SOURCES_COLUMNS = (*INDEX_COLUMNS, "acquisition")
# Layouts whose lesion and patient ids are issued by the ISIC archive for all its collections (HAM_...,
# IL_..., IP_...): the same id in two sources is the same lesion. Ids of the other layouts are a
# team's own ("L1", "P7"): namespaced by source so unrelated lesions are never joined.
ARCHIVE_ID_LAYOUTS = ("ham10000", "isic")


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


def _source_folders(src: Path | str | Sequence[Path | str]) -> list[Path]:
    """Every source resolved (:func:`_source_folder`), all checked before any is read: a mistyped
    second folder fails at once, not after the first is hashed. The same folder twice is refused."""
    given = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not given:
        raise BadInputError("give at least one source folder")
    srcs = [_source_folder(s) for s in given]
    repeated = sorted({str(s) for s in srcs if srcs.count(s) > 1})
    if repeated:
        raise BadInputError(f"{repeated[0]} is given twice: each source once")
    return srcs


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
    """The sources as prepare sees them before decoding: kept rows (with file and sha256) and problems."""

    table: pd.DataFrame  # INDEX-like columns plus _file (the image's path) and _origin (its source's position)
    problems: list[Problem]
    capped: int
    fingerprint: str
    root: Path  # the folder source paths are relative to (the first source's, for several)
    layout: str
    layout_detail: str
    classes: list[str]
    classes_from: str
    other_classes: dict[str, int]
    sources: list[dict[str, Any]]  # several sources: name, path, layout, layout_detail of each; [] for one
    identical: int = 0  # several sources: files found byte-identical in an earlier source (counted once)

    @property
    def excluded(self) -> int:
        return sum(self.other_classes.values())


def source_names(srcs: Sequence[Path]) -> list[str]:
    """A short name per source, stored in each row's ``dataset``: its folder name made safe and
    lower-cased (``HAM10000`` -> ``ham10000``), ``-2``, ``-3``... when two folders share a name."""
    names: list[str] = []
    for src in srcs:
        base = default_name(src).lower()
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _in_source(table: pd.DataFrame, problems: list[Problem], name: str,
               layout: str) -> tuple[pd.DataFrame, list[Problem]]:
    """One of several sources' rows and problems as the combined set names them: paths as
    ``name/path``, ``dataset`` = ``name`` (the row's own value kept as ``acquisition``), and lesion
    and patient ids as ``name:id`` unless the layout's ids are the ISIC archive's (ARCHIVE_ID_LAYOUTS)."""
    table = table.assign(source=name + "/" + table["source"], acquisition=table["dataset"], dataset=name)
    if layout not in ARCHIVE_ID_LAYOUTS:
        for column in ("lesion_id", "patient_id"):
            table[column] = table[column].where(table[column] == "", name + ":" + table[column])
    problems = [Problem(f"{name}/{p.file}" if p.file else name, p.image_id, p.kind, p.detail) for p in problems]
    return table, problems


def _read_sources(srcs: Sequence[Path], options: _Options) -> list[tuple[SourceTable, pd.DataFrame, list[Problem]]]:
    """Every source read in its layout and its bad rows dropped, before any image is hashed."""
    read = []
    for src in srcs:
        source = read_source(src, options.layout, options.columns)
        table, problems = drop_bad_rows(source.table, source.label)
        read.append((source, table, problems))
    return read


def _scan(srcs: Sequence[Path], options: _Options, workers: int, progress: Progress) -> _Scan:
    """Read the sources in their layouts, clean them, choose the classes over all of them, match image
    files, apply the cap, hash, drop files found in an earlier source, fingerprint."""
    read = _read_sources(srcs, options)
    names = source_names(srcs) if len(srcs) > 1 else []
    classes, classes_from = choose_classes(options.classes, pd.concat([t["dx"] for _, t, _ in read]))
    tables, problems = [], []
    other: dict[str, int] = {}
    for k, (source, table, dropped) in enumerate(read):
        table, missing, others = keep_classes(table, classes, source.label, source.lesion_ids)
        table, file_problems = match_files(table, source.files, source.listed, source.root)
        found = source.problems + dropped + missing + source.scan_problems + file_problems
        table = table.assign(_file=[source.root / f for f in table["source"]], _origin=k)
        if names:
            table, found = _in_source(table, found, names[k], source.layout)
        tables.append(table)
        problems += found
        for c, n in others.items():
            other[c] = other.get(c, 0) + n
    table = pd.concat(tables, ignore_index=True)
    capped = 0
    if options.max_per_class is not None:
        before = len(table)
        table = table.loc[cap_per_class(_unique_ids(table), options.max_per_class, options.seed).index]
        capped = before - len(table)
    hashes = parallel_map(_sha256_or_none, list(table["_file"]), workers, progress, "Hashing images")
    table = table.assign(sha256=hashes)
    unreadable = table["sha256"].isna()
    problems += [Problem(r.source, r.image_id, "unreadable", "cannot read the file")
                 for r in table[unreadable].itertuples()]
    table = table[~unreadable].reset_index(drop=True)
    table, copies = _same_files(table)
    problems += copies
    first = read[0][0]
    key = {**options.key(), "classes": classes, "classes_from": classes_from, "layout": first.layout,
           "layout_detail": first.detail, "other_classes": {c: other[c] for c in sorted(other)}}
    metadata = first.digest
    layout, detail, sources = first.layout, first.detail, []
    if names:
        sources = [{"name": n, "path": str(src), "layout": s.layout,
                    "layout_detail": s.detail} for n, src, (s, _, _) in zip(names, srcs, read)]
        layout = "+".join(dict.fromkeys(s.layout for s, _, _ in read))
        detail = "; ".join(f"{n}: {s.detail}" for n, (s, _, _) in zip(names, read))
        key = {**key, "layout": layout, "layout_detail": detail, "sources": sources}
        metadata = digest(*(s.digest.encode() for s, _, _ in read))
    fingerprint = _fingerprint(metadata, table, problems, key)
    return _Scan(table, problems, capped, fingerprint, first.root, layout, detail, classes, classes_from,
                 key["other_classes"], sources, sum(p.kind == "duplicate_across_sources" for p in copies))


def _same_files(table: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """Byte-identical files (one sha256) in several sources are one image: the earliest source's rows
    are kept and the later copies listed (``duplicate_across_sources``); when the copies carry different
    labels no one can tell which is right, and every copy is left out (``conflicting_labels``), as rows
    of one source that disagree are. Copies within one source are the layout's business (clean.py)."""
    spread = table.groupby("sha256")["_origin"].transform("nunique") > 1
    if not spread.any():
        return table, []
    drop: list[int] = []
    problems = []
    for _, rows in table[spread].groupby("sha256", sort=False):
        where = ", ".join(f"{r.source} ({r.dx})" for r in rows.itertuples())
        if rows["dx"].nunique() > 1:
            drop += list(rows.index)
            problems += [Problem(r.source, r.image_id, "conflicting_labels",
                                 f"the same file under different labels: {where}") for r in rows.itertuples()]
            continue
        kept = rows[rows["_origin"] == rows["_origin"].min()].iloc[0]
        later = rows[rows["_origin"] != rows["_origin"].min()]
        drop += list(later.index)
        problems += [Problem(r.source, r.image_id, "duplicate_across_sources",
                             f"the same file as {kept['source']} ({kept['image_id']}): counted once")
                     for r in later.itertuples()]
    return table.drop(index=drop).reset_index(drop=True), problems


def _sha256_or_none(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (permissions, removed since it was listed)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _unique_ids(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with image ids made unique across sources (``<position>:<id>``), for grouping before
    the final ids are chosen (:func:`_namespace_ids`): two sources' ``img_001`` are two images."""
    if table["_origin"].nunique() < 2:
        return table
    return table.assign(image_id=table["_origin"].astype(str) + ":" + table["image_id"])


def _namespace_ids(table: pd.DataFrame) -> pd.DataFrame:
    """Image ids that two sources both use become ``<source>:<id>`` (every row holding one); the others
    stay as they are, so an image found in one source keeps the id its source gave it."""
    colliding = table.groupby("image_id")["_origin"].transform("nunique") > 1
    return table.assign(image_id=table["image_id"].where(~colliding, table["dataset"] + ":" + table["image_id"]))


@dataclass
class _AcrossSources:
    """Near-duplicates between sources: the copies left out and the edges that keep their groups whole."""

    keep: np.ndarray  # row positions kept
    pairs: np.ndarray  # the near-duplicate pairs between kept rows (renumbered), with their distances
    distances: np.ndarray
    bridges: np.ndarray  # (m, 2) kept rows that were one group through a row left out
    problems: list[Problem]
    cross_pairs: int  # near-duplicate pairs between two sources (removed or grouped)


def _near_copies(table: pd.DataFrame, pairs: np.ndarray, distances: np.ndarray) -> _AcrossSources:
    """Near-duplicates in two sources (ISIC 2019 holds HAM10000's images at another size): the later
    source's copy is left out (``duplicate_across_sources``) when both carry one label, so no image counts
    twice; pairs whose labels differ stay, grouped on one side, a label conflict in ``data duplicates``
    (at the threshold, look-alike photos of two lesions pair too). The groups are those of every row,
    copies included, so two images joined only through a removed copy still share a side."""
    origin, dx = table["_origin"].to_numpy(), table["dx"].to_numpy(dtype=object)
    cross = origin[pairs[:, 0]] != origin[pairs[:, 1]] if len(pairs) else np.zeros(0, dtype=bool)
    removed: dict[int, tuple[int, float]] = {}
    for (i, j), distance in zip(pairs[cross].tolist(), distances[cross].tolist()):
        if dx[i] == dx[j]:
            early, late = (i, j) if origin[i] < origin[j] else (j, i)
            removed.setdefault(late, (early, distance))
    sources, ids = table["source"].to_numpy(dtype=object), table["image_id"].to_numpy(dtype=object)
    problems = [Problem(sources[late], ids[late], "duplicate_across_sources",
                        f"a near-duplicate (distance {d:.3f}) of {sources[early]} ({ids[early]}): counted once")
                for late, (early, d) in sorted(removed.items())]
    keep = np.array([i for i in range(len(table)) if i not in removed], dtype=np.int64)
    position = np.full(len(table), -1, dtype=np.int64)
    position[keep] = np.arange(len(keep))
    both = (position[pairs[:, 0]] >= 0) & (position[pairs[:, 1]] >= 0) if len(pairs) else np.zeros(0, dtype=bool)
    groups = group_keys(_unique_ids(table), pairs).to_numpy(dtype=object)[keep]
    first: dict[str, int] = {}
    edges = []
    for i, group in enumerate(groups.tolist()):
        if first.setdefault(group, i) != i:
            edges.append((i, first[group]))
    bridges = np.array(edges, dtype=np.int64).reshape(-1, 2)
    return _AcrossSources(keep, position[pairs[both]].reshape(-1, 2), distances[both], bridges, problems,
                          int(cross.sum()))


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


def _sources_entry(scan: _Scan, table: pd.DataFrame, across: _AcrossSources) -> dict[str, Any]:
    """The manifest's ``sources`` (a set of several): each source's images kept, and what was found
    in two of them (files counted once, near-duplicate copies left out, pairs between sources)."""
    kept = table["dataset"].value_counts()
    return {"sources": [{**s, "images": int(kept.get(s["name"], 0))} for s in scan.sources],
            "across_sources": {"identical_files": scan.identical,
                               "near_duplicate_pairs": across.cross_pairs,
                               "near_duplicates_removed": len(across.problems),
                               "near_duplicates_grouped": across.cross_pairs - len(across.problems)}}


def _build(build: Path, target: Path, options: _Options, scan: _Scan, workers: int,
           progress: Progress) -> tuple[dict[str, Any], list[Problem], int, int]:
    """Write the whole set into the ``build`` folder. Returns manifest, problems, reused, decoded.

    Near-duplicate pairs join the groups before the split (one transitive closure with the lesion and
    patient ids), so a photograph filed under two lesion ids ends on one side. With several sources a
    near-duplicate of an earlier source's image is left out (:func:`_near_copies`) and image ids two
    sources share are namespaced (:func:`_namespace_ids`)."""
    cache = write_cache(build / CACHE_FILE, scan.table, scan.root, target, options.size, workers, progress,
                        files=list(scan.table["_file"]))
    problems = scan.problems + cache.problems
    table = scan.table[cache.ok].reset_index(drop=True)
    _check_usable(table, scan.classes)
    progress.start("Searching near-duplicates", total=1)
    pairs, distances, within = find_pairs(cache.fingerprints, options.near_duplicate_threshold)
    progress.advance()
    progress.finish()
    across, edges = None, pairs
    if scan.sources:
        across = _near_copies(table, pairs, distances)
        keep_rows(build / CACHE_FILE, cache.fingerprints, across.keep)
        problems += across.problems
        table = _namespace_ids(table.iloc[across.keep].reset_index(drop=True))
        pairs, distances = across.pairs, across.distances
        edges = np.concatenate([pairs, across.bridges])
    table["group"] = group_keys(table, edges)
    table["split"] = split_by_lesion(table["group"], table["dx"], options.fractions, options.seed)
    table["label"] = table["dx"].map({c: i for i, c in enumerate(scan.classes)}).astype(int)
    near = audit(table, pairs, distances, options.near_duplicate_threshold, within)
    write_pairs(build, near)
    manifest = _manifest(target.name, options, scan, table, problems, near.summary)
    if across is not None:
        manifest.update(_sources_entry(scan, table, across))
    columns = SEVERAL_SOURCES_COLUMNS if scan.sources else INDEX_COLUMNS
    atomic_write_bytes(build / "index.csv", _frame_bytes(table[list(columns)]))
    atomic_write_bytes(build / "problems.csv",
                       _frame_bytes(pd.DataFrame([p.row() for p in problems], columns=list(PROBLEM_COLUMNS))))
    atomic_write_json(build / "manifest.json", manifest)
    return manifest, problems, cache.reused, int(cache.ok.sum()) - cache.reused


def prepare(src: Path | Sequence[Path], *, name: str | None = None, classes: Sequence[str] | None = None, seed: int = 0,
            fractions: Sequence[float] | None = None, max_per_class: int | None = None,
            cache_size: tuple[int, int] | str = DEFAULT_CACHE_SIZE, workers: int | None = None,
            progress: Progress | None = None, root: Path | None = None, layout: str | None = None,
            external: bool = False, image_col: str | None = None, label_col: str | None = None,
            group_col: str | None = None, lesion_col: str | None = None,
            patient_col: str | None = None, near_duplicate_threshold: float = DEFAULT_THRESHOLD) -> PrepareReport:
    """Prepare the source ``src`` (a folder, or a CSV file; or a list of them) as data set ``name`` in the store.

    Several sources make one set (``name`` required): each row's ``dataset`` names its source, classes
    are matched by name, an image found in two sources counts once, and the split is grouped across
    them (docs/data.md, "Several sources in one set"); the other options apply to every source.

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
    srcs = _source_folders(src)
    if name is None and len(srcs) > 1:
        raise BadInputError(f"{len(srcs)} sources make one data set: name it with --name")
    if max_per_class is not None:
        max_per_class = _check_count(max_per_class, "--max-per-class", 1)
    options = _Options(None if classes is None else check_class_names(classes), _check_count(seed, "--seed", 0),
                       _check_fractions(fractions, bool(external)), max_per_class,
                       parse_size(cache_size, "--cache-size"), layout, bool(external),
                       _columns(image=image_col, label=label_col, group=group_col, lesion=lesion_col,
                                patient=patient_col), check_threshold(near_duplicate_threshold))
    name = _check_name(name) if name is not None else default_name(srcs[0])

    scan = _scan(srcs, options, workers, progress)
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
