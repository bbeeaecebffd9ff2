"""Where dermcam keeps things, and how it writes them without ever leaving half a file.

Layout under the store root (``DERMCAM_HOME`` or platformdirs' user data dir)::

    datasets/<name>/        prepared data sets (see dermcam.data)
    runs/<run_id>/          training runs and their checkpoints (see dermcam.checkpoints)
    locks/                  advisory lock files

Every file dermcam writes goes through :func:`atomic_write_bytes`: a temporary file in the same
folder, fsync, then ``os.replace``. A crash leaves either the old file or the new one, never a mix;
leftover temporaries end in ``.tmp`` and are safe to delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dermcam.errors import LockedError

TMP_SUFFIX = ".tmp"


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


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: on POSIX the directory entry must be synced too."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    """mkstemp creates 0600 files; give them the permissions a plain ``open()`` would (0666 & ~umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    if os.name == "posix":
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    For writers that want a file name rather than bytes (``safetensors.torch.save_file``,
    ``numpy.save``, ``PIL.Image.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _mkstemp_beside(path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def leftover_temporaries(folder: Path) -> list[Path]:
    """Temporary files that an interrupted write left behind (safe to delete)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob(f"*{TMP_SUFFIX}") if p.is_file())


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
