"""The image cache: every image decoded once into one memory-mapped uint8 array (``images.npy``).

Rows of images whose sha256 is already in the previous cache are copied instead of decoded, so a
re-run after a few images changed costs a few decodes. Only rows written by this cache format (the
manifest's ``cache`` entry, :func:`cache_entry`) are copied: a row from an older decoder would
silently differ from what this version decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from dermcam.data.images import ImageDecodeError, conversion_note_of, decode_image
from dermcam.data.problems import Problem
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


def _previous_rows(target: Path, size: tuple[int, int]) -> tuple[np.ndarray | None, dict[str, int]]:
    """The previous cache of this set (when its size and format match) and its rows by image sha256."""
    try:
        manifest = read_json(target / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("cache") != cache_entry(size):
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

    for i, note, error in parallel_map(decode, todo, workers, progress, "Decoding images"):
        source, image_id = sources[i], image_ids[i]
        if error is not None:
            ok[i] = False
            problems.append(Problem(source, image_id, error.kind, str(error)))
        elif note:
            problems.append(Problem(source, image_id, "converted", note))
    return ok, problems, len(table) - len(todo)


def write_cache(path: Path, table: pd.DataFrame, src: Path, target: Path, size: tuple[int, int],
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
