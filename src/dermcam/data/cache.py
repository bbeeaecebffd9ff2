"""The image cache: every image decoded once into one memory-mapped uint8 array (``images.npy``), and
in the same pass its near-duplicate fingerprint (``fingerprints.npy``, :mod:`dermcam.data.fingerprint`).

Rows of images whose sha256 is already in the previous cache are copied instead of decoded, so a
re-run after a few images changed costs a few decodes. Only rows written by this cache format (the
manifest's ``cache`` entry, :func:`cache_entry`) with fingerprints of this format (its
``fingerprints`` entry, :func:`~dermcam.data.fingerprint.fingerprint_entry`) are copied: a row from
an older decoder would silently differ from what this version decodes, and a set prepared before
fingerprints existed is decoded again once, which computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from dermcam.data.fingerprint import DTYPE, FINGERPRINT_FILE, SHAPE, fingerprint_entry
from dermcam.data.images import ImageDecodeError, conversion_note_of, decode_with_fingerprint
from dermcam.data.problems import Problem
from dermcam.errors import CorruptError, NotFoundError, first_line
from dermcam.progress import Progress
from dermcam.store.files import atomic_path, read_json

CACHE_FILE = "images.npy"


# Bump when decoding, resizing or splitting changes: old sets stop matching prepare's fingerprint and
# their cache rows are decoded again instead of copied.
FORMAT_VERSION = 1


T = TypeVar("T")


R = TypeVar("R")


def parallel_map(func: Callable[[T], R], items: Sequence[T], workers: int, progress: Progress,
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


def cache_entry(size: tuple[int, int]) -> dict[str, Any]:
    """The manifest's ``cache`` entry for a cache of ``size`` = (W, H) written by this version."""
    return {"file": CACHE_FILE, "width": size[0], "height": size[1], "dtype": "uint8", "layout": "NHWC",
            "format": FORMAT_VERSION}


def load_fingerprints(folder: Path, manifest: dict[str, Any], rows: int) -> np.ndarray:
    """The (rows, *SHAPE) fingerprints of the set in ``folder``, checked against its manifest.

    The one check of a fingerprint file, for reading a set and for reusing rows of the previous one:
    NotFoundError when the set has none of this format (prepared before they existed, another format,
    the file gone), CorruptError when the file is damaged (not an .npy, a pickle, another shape or
    dtype, a row count other than the index's, a value that is not finite). Loaded whole, without
    pickle: 4.6 KB an image, 46 MB for 10,000.
    """
    entry = manifest.get("fingerprints") if isinstance(manifest, dict) else None
    if entry != fingerprint_entry():
        raise NotFoundError("no near-duplicate fingerprints (prepared before they existed)" if entry is None
                            else f"its fingerprints are of another format ({entry!r})")
    path = folder / FINGERPRINT_FILE
    try:
        fps = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise NotFoundError(f"{FINGERPRINT_FILE} is missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptError(f"{FINGERPRINT_FILE} is damaged ({first_line(exc)})") from None
    if fps.dtype != DTYPE or fps.shape != (rows, *SHAPE):
        raise CorruptError(f"{FINGERPRINT_FILE} is damaged: {fps.dtype} {fps.shape}, expected "
                           f"{np.dtype(DTYPE).name} {(rows, *SHAPE)}")
    if not np.isfinite(fps).all():
        raise CorruptError(f"{FINGERPRINT_FILE} is damaged: it holds values that are not finite numbers")
    return fps


@dataclass
class _Previous:
    """The previous version of the set, where its rows can be reused: cache, fingerprints, row of each sha256."""

    images: np.ndarray | None = None
    fingerprints: np.ndarray | None = None
    rows: dict[str, int] = field(default_factory=dict)


def _previous_rows(target: Path, size: tuple[int, int]) -> _Previous:
    """The previous cache and fingerprints of this set, when its size and both formats match."""
    try:
        manifest = read_json(target / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("cache") != cache_entry(size):
            return _Previous()
        index = pd.read_csv(target / "index.csv", dtype=str, keep_default_na=False)
        images = np.load(target / CACHE_FILE, mmap_mode="r", allow_pickle=False)
        fingerprints = load_fingerprints(target, manifest, len(index))
    except (OSError, ValueError, KeyError, NotFoundError, CorruptError):
        return _Previous()
    if images.shape != (len(index), size[1], size[0], 3):
        return _Previous()
    return _Previous(images, fingerprints, {sha: i for i, sha in enumerate(index["sha256"])})


@dataclass
class CacheResult:
    """What :func:`write_cache` did: which rows succeeded, the problems found, the rows reused, and the
    fingerprints of the rows kept (also in ``fingerprints.npy``)."""

    ok: np.ndarray
    problems: list[Problem]
    reused: int
    fingerprints: np.ndarray


def _fill_cache(cache: np.ndarray, fingerprints: np.ndarray, table: pd.DataFrame, files: Sequence[Path],
                old: _Previous, size: tuple[int, int], workers: int,
                progress: Progress) -> tuple[np.ndarray, list[Problem], int]:
    """Write every row's image (from ``files``) into ``cache`` and its fingerprint into ``fingerprints``:
    copied from ``old`` when its sha256 is known there, decoded otherwise. Returns which rows succeeded,
    the problems found, and the rows reused."""
    ok = np.ones(len(table), dtype=bool)
    problems: list[Problem] = []
    todo: list[int] = []
    for i, (source, sha, image_id) in enumerate(zip(table["source"], table["sha256"], table["image_id"])):
        if old.images is not None and old.fingerprints is not None and sha in old.rows:
            cache[i] = old.images[old.rows[sha]]
            fingerprints[i] = old.fingerprints[old.rows[sha]]
            note = conversion_note_of(files[i])  # report the conversion again
            if note:
                problems.append(Problem(source, image_id, "converted", note))
        else:
            todo.append(i)

    sources, image_ids = list(table["source"]), list(table["image_id"])

    def decode(i: int) -> tuple[int, str | None, ImageDecodeError | None]:
        try:
            cache[i], note, fingerprints[i] = decode_with_fingerprint(files[i], size)
            return i, note, None
        except ImageDecodeError as exc:
            return i, None, exc

    for i, note, error in parallel_map(decode, todo, workers, progress, "Decoding images"):
        source, image_id = sources[i], image_ids[i]
        if error is not None:
            ok[i] = False
            problems.append(Problem(source, image_id, error.kind, str(error)))
        elif note:
            problems.append(Problem(source, image_id, "converted", note))
    return ok, problems, len(table) - len(todo)


def write_cache(path: Path, table: pd.DataFrame, src: Path, target: Path, size: tuple[int, int],
                workers: int, progress: Progress, files: Sequence[Path] | None = None) -> CacheResult:
    """Build ``images.npy`` at ``path`` and ``fingerprints.npy`` beside it for ``table``'s rows; rows
    that fail to decode are dropped from both. ``target`` is the set's folder, whose previous version
    lends its rows. ``files``: each row's image file (default: ``src`` / its ``source``; a set of
    several sources has no one folder its rows are relative to)."""
    old = _previous_rows(target, size)
    files = [src / s for s in table["source"]] if files is None else list(files)
    fingerprints = np.zeros((len(table), *SHAPE), dtype=DTYPE)
    with atomic_path(path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(table), size[1], size[0], 3))
        ok, problems, reused = _fill_cache(cache, fingerprints, table, files, old, size, workers, progress)
        cache.flush()
        del cache
    if not ok.all():
        _compact(path, np.flatnonzero(ok))
    fingerprints = fingerprints[ok]
    _save_fingerprints(path.parent, fingerprints)
    return CacheResult(ok, problems, reused, fingerprints)


def _save_fingerprints(folder: Path, fingerprints: np.ndarray) -> None:
    with atomic_path(folder / FINGERPRINT_FILE) as tmp, open(tmp, "wb") as handle:
        np.save(handle, fingerprints, allow_pickle=False)


def keep_rows(path: Path, fingerprints: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Keep only the rows ``keep`` (positions) of the cache at ``path`` and of ``fingerprints`` (both
    rewritten); returns the fingerprints kept. For rows found to be copies only after decoding (a
    near-duplicate from another source, :mod:`dermcam.data.prepare`)."""
    keep = np.asarray(keep, dtype=np.int64)
    if len(keep) == len(fingerprints):
        return fingerprints
    _compact(path, keep)
    fingerprints = fingerprints[keep]
    _save_fingerprints(path.parent, fingerprints)
    return fingerprints


def _compact(path: Path, keep: np.ndarray, chunk: int = 256) -> None:
    """Rewrite the cache at ``path`` with only the rows ``keep`` (in chunks: never all in memory)."""
    full = np.load(path, mmap_mode="r", allow_pickle=False)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *full.shape[1:]))
        for start in range(0, len(keep), chunk):
            out[start:start + chunk] = full[keep[start:start + chunk]]
        out.flush()
        del out, full
