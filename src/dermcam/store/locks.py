"""Advisory file locks, so that commands running at the same time never see each other's half-done work.

Training holds ``store`` shared while it writes a checkpoint and ``run-<id>`` for as long as it runs;
prune and clean take ``store`` exclusively, so they never delete half of a checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from dermcam.errors import LockedError
from dermcam.store.paths import home


@contextlib.contextmanager
def store_lock(name: str = "store", *, shared: bool = False, timeout: float = 30.0,
               root: Path | None = None) -> Iterator[None]:
    """An advisory inter-process lock (``fcntl.flock``) over part of the store.

    Writers that change what other processes rely on (training saving checkpoints, prune deleting
    them) take it exclusively; readers may take it shared. Raises :class:`LockedError` after
    ``timeout`` seconds rather than hanging forever.
    """
    lock_dir = (root or home()) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f"{name}.lock", "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; single-process use only
            yield
            return
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"another dermcam process holds the '{name}' lock in {lock_dir}; "
                        "wait for it to finish and try again"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def is_locked(name: str, root: Path | None = None) -> bool:
    """True when another process holds ``name`` exclusively (e.g. ``run-<id>`` while that run trains)."""
    lock_file = (root or home()) / "locks" / f"{name}.lock"
    if not lock_file.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False
