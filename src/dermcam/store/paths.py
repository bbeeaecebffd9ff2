"""Where the store lives: ``DERMCAM_HOME``, else platformdirs' user data folder.

Layout under the store root::

    datasets/<name>/        prepared data sets (see dermcam.data)
    runs/<run_id>/          training runs and their checkpoints (see dermcam.store.checkpoint)
    locks/                  advisory lock files (see dermcam.store.locks)
"""

from __future__ import annotations

import os
from pathlib import Path


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
