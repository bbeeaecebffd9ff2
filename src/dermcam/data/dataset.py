"""Prepared data sets as training and evaluation read them: the manifest, the index and the memory-mapped cache.

The on-disk format is a contract between ``prepare`` and everything that reads a set::

    <store root>/datasets/<name>/
        manifest.json   schema "dermcam.dataset/1": classes, label encoding, counts, audit, fingerprint,
                        layout, external, grouping (older sets lack the last three: not external)
        index.csv       one row per image; row i describes images[i] (older sets lack patient_id, dataset
                        and group: they are filled in when read, group from lesion_id or the image)
        images.npy      uint8 N x H x W x 3, loaded with np.load(mmap_mode="r")
        problems.csv    every problem found in the source and what was done about it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermcam.data.split import SPLITS, group_keys
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
