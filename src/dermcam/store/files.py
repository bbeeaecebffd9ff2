"""Writing files so that a crash never leaves half of one, and reading them back.

Every file dermcam writes goes through :func:`atomic_write_bytes` (or :func:`atomic_path` for writers
that need a path): a temporary file in the same folder, fsync, then ``os.replace``. A crash leaves
either the old file or the new one, never a mix; leftover temporaries end in ``.tmp`` and are safe to
delete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


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


# A temporary (or a run folder) younger than this may belong to a write in progress and is kept.
FRESH_TEMPORARY_S = 60.0


def recently_written(*paths: Path) -> bool:
    """True when any of ``paths`` changed within :data:`FRESH_TEMPORARY_S`: maybe still being written."""
    return any(time.time() - p.stat().st_mtime < FRESH_TEMPORARY_S for p in paths)


def leftover_temporaries(folder: Path) -> list[Path]:
    """Temporary files that an interrupted write left behind (safe to delete)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob(f"*{TMP_SUFFIX}") if p.is_file())


def utc_now(timespec: str = "seconds") -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
