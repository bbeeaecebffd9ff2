"""One folder per class (torchvision's ImageFolder convention): ``SRC/mel/*.jpg``, ``SRC/nv/*.jpg``.

The class is the top-level folder's name (any image below it belongs to it: deeper folders are not
classes); the image_id is the file name without extension. There are no lesion or patient ids, so
every image is a group of its own. A mistyped folder (``mle/``) is a class of its own, which the
class choice then leaves out and the summary lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dermcam.data.problems import Problem
from dermcam.data.sources.common import SourceTable, digest, entries, is_image_name, normalised, subfolders, walk_images
from dermcam.errors import BadInputError


def _has_image(folder: Path) -> bool:
    for _, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_image_name(n) for n in names):
            return True
    return False


def detect(src: Path) -> str | None:
    """Why ``src`` looks like one folder per class (at least two folders holding images), or None."""
    classes = [p.name for p in subfolders(src) if _has_image(p)]
    if len(classes) < 2:
        return None
    shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    return f"{len(classes)} class folders ({shown})"


def read(src: Path) -> SourceTable:
    """The folder-per-class source ``src`` as a source table (see the module doc)."""
    scan_problems = [Problem(p.name, p.stem, "unlisted_image", "image outside every class folder")
                     for p in entries(src) if is_image_name(p.name)]
    rows = []
    for folder in subfolders(src):
        files, problems = walk_images(src, folder)
        scan_problems += problems
        rows += [(image_id, path, folder.name) for image_id, paths in files.items() for path in paths]
    if not rows:
        raise BadInputError(f"{src} has no class folder with images: expected one folder per class, "
                            "such as mel/*.jpg and nv/*.jpg")
    frame = pd.DataFrame(rows, columns=["image_id", "source", "dx"]).sort_values("source", kind="stable")
    listing = "\n".join(f"{s}\t{d}" for s, d in zip(frame["source"], frame["dx"])).encode()
    return SourceTable("folders", f"{frame['dx'].nunique()} class folders", src,
                       normalised(frame, (f"file {s}" for s in frame["source"])), "", digest(listing),
                       scan_problems=scan_problems)
