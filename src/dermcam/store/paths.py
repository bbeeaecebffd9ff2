"""Where the store lives: ``DERMCAM_HOME``, else platformdirs' user data folder.

Layout under the store root::

    datasets/<name>/        prepared data sets (see dermcam.data)
    runs/<run_id>/          training runs and their checkpoints (see dermcam.store.checkpoint)
    ensembles/<name>.json   ensembles: manifests naming member checkpoints (see dermcam.store.ensembles)
    crossval/<name>/        cross-validations: cv.json and the out-of-fold predictions (see dermcam.store.crossval)
    locks/                  advisory lock files (see dermcam.store.locks)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dermcam.errors import CorruptError, DermcamError

# One path component: no separator, no leading dot (so never "." or ".." or a hidden temporary).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")


def home() -> Path:
    """The store root. ``DERMCAM_HOME`` wins so tests, demos and CI never touch the real one."""
    override = os.environ.get("DERMCAM_HOME")
    if override:
        return Path(override).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("dermcam", appauthor=False))


def datasets_dir(root: Path | None = None) -> Path:
    return (root or home()) / "datasets"


def runs_dir(root: Path | None = None) -> Path:
    return (root or home()) / "runs"


def ensembles_dir(root: Path | None = None) -> Path:
    return (root or home()) / "ensembles"


def crossval_dir(root: Path | None = None) -> Path:
    return (root or home()) / "crossval"


def contained(base: Path, name: object, what: str, error: type[DermcamError] = CorruptError) -> Path:
    """``base / name``, refused unless ``name`` is one plain name that stays inside ``base``.

    Every path built from store content (a sidecar's file names, run ids, data set names) or from the
    command line (``--run``, checkpoint ids) goes through here, so that no file and no argument can make
    a command read or delete something elsewhere: a name is a name, never a path. A symlink leading
    out of ``base`` is refused too. ``error`` is CorruptError for store content (the store is damaged)
    and BadInputError for what the user typed.
    """
    damaged = " (damaged or modified)" if issubclass(error, CorruptError) else ""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise error(f"{what} {name!r} is not a plain name inside {base}{damaged}")
    path = Path(base) / name
    if not path.resolve().is_relative_to(Path(base).resolve()):
        raise error(f"{what} {name!r} leads outside {base}{damaged}")
    return path
