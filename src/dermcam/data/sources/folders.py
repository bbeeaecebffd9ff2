"""One folder per class (torchvision's ImageFolder convention): ``SRC/mel/*.jpg``, ``SRC/nv/*.jpg``.

The class is the top-level folder's name, trimmed and normalised like any label (``" mel"`` is
``mel``); any image below it belongs to it (deeper folders are not classes); the image_id is the file
name without extension. There are no lesion or patient ids, so every image is a group of its own. A
mistyped folder (``mle/``) is a class of its own, which the class choice then leaves out and the
summary lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dermcam.data.problems import Problem
from dermcam.data.sources.common import SourceFolder, SourceTable, digest, is_image_name, normalised
from dermcam.errors import BadInputError


def _has_image(folder: Path) -> bool:
    for _, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_image_name(n) for n in names):
            return True
    return False


def detect(folder: SourceFolder) -> str | None:
    """Why the source looks like one folder per class (at least two folders holding images), or None."""
    classes = [p.name for p in folder.subfolders(folder.root) if _has_image(p)]
    if len(classes) < 2:
        return None
    shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    return f"{len(classes)} class folders ({shown})"


def read(folder: SourceFolder) -> SourceTable:
    """The folder-per-class source ``folder`` as a source table (see the module doc)."""
    scan_problems = [Problem(p.name, p.stem, "unlisted_image", "image outside every class folder")
                     for p in folder.images(folder.root)]
    rows = []
    for class_folder in folder.subfolders(folder.root):
        files, problems = folder.walk_images(class_folder)
        scan_problems += problems
        rows += [(image_id, path, class_folder.name) for image_id, paths in files.items() for path in paths]
    if not rows:
        raise BadInputError(f"{folder.root} has no class folder with images: expected one folder per class, "
                            "such as mel/*.jpg and nv/*.jpg")
    frame = pd.DataFrame(rows, columns=["image_id", "source", "dx"]).sort_values("source", kind="stable")
    listing = "\n".join(f"{s}\t{d}" for s, d in zip(frame["source"], frame["dx"])).encode()
    return SourceTable("folders", f"{frame['dx'].nunique()} class folders", folder.root,
                       normalised(frame, (f"file {s}" for s in frame["source"])), "", digest(listing),
                       scan_problems=scan_problems)
