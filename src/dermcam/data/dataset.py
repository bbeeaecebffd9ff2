"""Prepared data sets as training and evaluation read them: the manifest, the index and the memory-mapped cache.

The on-disk format is a contract between ``prepare`` and everything that reads a set::

    <store root>/datasets/<name>/
        manifest.json   schema "dermcam.dataset/1": classes, label encoding, counts, audit, fingerprint,
                        layout, external, grouping (older sets lack the last three: not external)
        index.csv       one row per image; row i describes images[i] (older sets lack patient_id, dataset
                        and group: they are filled in when read, group from lesion_id or the image)
        images.npy      uint8 N x H x W x 3, loaded with np.load(mmap_mode="r")
        fingerprints.npy  float16 N x 12 x 192 near-duplicate fingerprints (older sets lack it: fingerprints())
        duplicates.csv  the near-duplicate pairs prepare grouped (older sets lack it)
        problems.csv    every problem found in the source and what was done about it
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermcam.data.cache import load_fingerprints
from dermcam.data.fingerprint import DEFAULT_THRESHOLD
from dermcam.data.geometry import DEFAULT_CACHE_SIZE
from dermcam.data.split import DEFAULT_FRACTIONS, SPLITS, group_keys
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.files import read_json
from dermcam.store.locks import store_lock
from dermcam.store.paths import contained, datasets_dir

SCHEMA = "dermcam.dataset/1"


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

    @property
    def external(self) -> bool:
        """Prepared with ``--external``: every image in test, for evaluation only, never trained on."""
        return self.manifest.get("external") is True

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Row indices into ``images`` and their integer labels for ``train``, ``val`` or ``test``."""
        if which not in SPLITS:
            raise BadInputError(f"unknown split '{which}'; choose from {', '.join(SPLITS)}")
        rows = np.flatnonzero(self.index["split"].to_numpy() == which)
        return rows, self.index["label"].to_numpy(dtype=np.int64)[rows]

    def fingerprints(self) -> np.ndarray:
        """The (N, 12, 192) float16 near-duplicate fingerprints, row i of image i (validated, no pickle).

        Not recomputed here: that needs the source unchanged (its sha256s checked) and a write into
        the set under the store's lock, which is what ``prepare`` does; a read never writes. So a set
        prepared before fingerprints existed raises NotFoundError (exit 3), a damaged file
        CorruptError (exit 4), each one line naming the ``dermcam prepare`` command that rebuilds it
        (copying its cache rows when their format still matches, decoding the rest).
        """
        try:
            return load_fingerprints(self.path, self.manifest, len(self.index))
        except (NotFoundError, CorruptError) as exc:
            raise type(exc)(f"data set '{self.name}': {exc}; run: {self.prepare_command()}") from None

    def prepare_command(self) -> str:
        """The ``dermcam prepare`` command line that rebuilds this set as it is: its source, name and
        every recorded option that differs from the default (column options of the csv layout given
        by hand are not recorded: add them)."""
        return prepare_command(self.manifest, self.name)


def prepare_command(manifest: dict[str, Any], name: str) -> str:
    """See :meth:`PreparedDataset.prepare_command`; quoted for a POSIX shell."""
    m = manifest
    several = m.get("sources") if isinstance(m.get("sources"), list) else []  # a set of several sources
    paths = [str(s.get("path") or "SRC") for s in several if isinstance(s, dict)] or [str(m.get("source") or "SRC")]
    words = ["dermcam", "prepare", *paths, "--name", name]
    first = several[0] if several and isinstance(several[0], dict) else m
    if not str(first.get("layout_detail", "detected")).startswith("detected") and first.get("layout"):
        words += ["--layout", str(first["layout"])]
    if m.get("classes_from") == "option":
        words += ["--classes", ",".join(map(str, m.get("classes", [])))]
    if m.get("seed", 0) != 0:
        words += ["--seed", str(m["seed"])]
    if m.get("external"):
        words.append("--external")
    elif m.get("fractions") not in (None, list(DEFAULT_FRACTIONS)):
        words += ["--fractions", ",".join(map(str, m["fractions"]))]
    if m.get("max_per_class") is not None:
        words += ["--max-per-class", str(m["max_per_class"])]
    cache = m.get("cache") or {}
    if (cache.get("width"), cache.get("height")) not in ((None, None), tuple(DEFAULT_CACHE_SIZE)):
        words += ["--cache-size", f"{cache['width']}x{cache['height']}"]
    threshold = (m.get("near_duplicates") or {}).get("threshold", DEFAULT_THRESHOLD)
    if threshold != DEFAULT_THRESHOLD:
        words += ["--duplicate-threshold", str(threshold)]
    return shlex.join(words)


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
        path = contained(datasets_dir(root), name, "data set name", BadInputError)
        if not (path / "manifest.json").is_file():
            names = ", ".join(m["name"] for m in available) or "none; run: dermcam prepare SRC"
            raise NotFoundError(f"no prepared data set named '{name}' (available: {names})")
        return _open(path)


def _open(path: Path) -> PreparedDataset:
    try:
        manifest = read_json(path / "manifest.json")
        index = pd.read_csv(path / "index.csv", dtype=str, keep_default_na=False)
        index["label"] = index["label"].astype(np.int64)
        for column in ("patient_id", "dataset"):  # sets prepared before these columns existed
            if column not in index.columns:
                index[column] = ""
        if "group" not in index.columns:
            index["group"] = group_keys(index)
        images = np.load(path / manifest["cache"]["file"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptError(f"data set at {path} is damaged ({exc}); prepare it again") from None
    cache = manifest["cache"]
    expected = (len(index), cache["height"], cache["width"], 3)
    if manifest.get("schema") != SCHEMA or images.shape != expected or images.dtype != np.uint8:
        raise CorruptError(f"data set at {path} is damaged: images.npy is {images.shape} {images.dtype}, "
                           f"expected {expected} uint8; prepare it again")
    return PreparedDataset(manifest["name"], path, manifest, list(manifest["classes"]), index, images)
