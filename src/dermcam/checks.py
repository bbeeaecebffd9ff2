"""Option values checked before any work starts: whole numbers in a range, text that names something,
and the paths output goes to.

The CLI runs these before it reads a data set or loads a model, and library functions run them on
their own arguments, so a bad value is one ``BadInputError`` line (exit code 2) naming the option and
what it accepts, never a failure deep inside numpy or torch, and never a half-written output folder.
"""

from __future__ import annotations

import numbers
import os
import unicodedata
from pathlib import Path

from dermcam.errors import BadInputError

# Seeds: numpy's legacy generator takes 0..2**32-1 (torch.manual_seed takes more); one range for every
# seed, so a seed that works for one command works for all and a training seed stays within what
# rng.seed_rank derives per epoch and rank without overflowing torch's 64 bits.
SEED_MAX = 2**32 - 1
MAX_EPOCHS = 10_000  # a run of more epochs is a typo, not an experiment
MAX_BATCH_SIZE = 65_536  # images per batch; 2**16 is already more than any GPU holds at 32 x 32 pixels
MAX_COUNT = 2**31 - 1  # any other count (workers, resamples, images per class): what an int32 index holds


def describe_range(low: int | None, high: int | None) -> str:
    """``a whole number from 0 to 4294967295`` / ``of at least 1`` / ``of at most 9``: what an option accepts."""
    if low is not None and high is not None:
        return f"a whole number from {low} to {high}"
    if low is not None:
        return f"a whole number of at least {low}"
    return "a whole number" + (f" of at most {high}" if high is not None else "")


def shown(value: object, limit: int = 40) -> str:
    """``value`` for a one-line message: its repr (control characters escaped), cut at ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def check_int(value: object, option: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is a whole number (not a bool, float or string) in ``[low, high]``;
    else a BadInputError naming ``option`` and the range."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise BadInputError(f"{option} must be {describe_range(low, high)}, not {shown(value)}")
    return int(value)


def cpu_count() -> int:
    """Cores this process may run on (its affinity where the system tells it, else all): what
    ``--threads`` is measured against."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(value: object, option: str = "--threads") -> int | str:
    """``auto`` or a whole number from 1 to 4x the cores (more threads than that only wait on each
    other): the value of ``--threads`` for serve, explain, evaluate and train, checked before any work.
    A string of digits (from a config or a script) counts as the number it spells."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            value = int(text)
    high = 4 * cpu_count()
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)) or not 1 <= value <= high:
        raise BadInputError(f"{option} must be auto or {describe_range(1, high)}, not {shown(value)}")
    return int(value)


def check_text(value: str, option: str) -> str:
    """A value that names something (a device, a layer, a checkpoint, a file): refused when it is empty or
    blank (an empty path is the current folder, an empty reference would fall back to a default) or when
    it holds a control character (a newline splits the one-line messages and logs that quote it)."""
    if not isinstance(value, str):
        raise BadInputError(f"{option} must be text, not {shown(value)}")
    if not value.strip():
        raise BadInputError(f"{option} is empty; give a value or leave the option out")
    if any(map(is_control, value)):
        raise BadInputError(f"{option} {shown(value)} contains a control character")
    return value


def is_control(char: str) -> bool:
    """A character that moves the cursor or ends a line rather than showing something: a newline, a tab,
    an escape (ASCII and C1 controls), a Unicode line or paragraph separator. Other unprintable
    characters (a no-break space, a zero-width joiner) are part of real names and stay allowed."""
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")


def _exists(path: Path, option: str) -> bool:
    """``path.exists()``, with a path no file can have (a NUL character: pathlib says "does not exist",
    writing it fails) or that the system refuses to look up (a name too long) as a BadInputError."""
    if "\0" in str(path):
        raise BadInputError(f"{option} {shown(str(path))} contains a NUL character")
    try:
        return path.exists()
    except OSError as exc:
        raise BadInputError(f"{option} {shown(str(path))}: {exc.strerror or exc}") from None


def _check_writable_folder(path: Path, option: str, shown_path: Path) -> None:
    """Refuse ``shown_path`` unless the nearest existing folder at or above ``path`` (the filesystem root
    always exists) is a folder dermcam can create entries in."""
    path = path.absolute()
    ancestor = next(p for p in (path, *path.parents) if _exists(p, option))
    if not ancestor.is_dir():
        raise BadInputError(f"{option} {shown_path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInputError(f"{option} {shown_path}: no permission to write in {ancestor}")


def check_output_dir(path: Path | str, option: str = "--out") -> Path:
    """A folder output will be written into: an existing folder, or one that can be created (its nearest
    existing parent is a writable folder). Nothing is created here: the check runs before any work,
    so a bad path is refused before anything is half-written."""
    path = Path(path)
    if _exists(path, option) and not path.is_dir():
        raise BadInputError(f"{option} {path} is a file, not a folder")
    _check_writable_folder(path, option, path)
    return path


def check_output_file(path: Path | str, option: str) -> Path:
    """A file output will be written to (created or replaced): not a folder, and its folder exists or can
    be created. Like :func:`check_output_dir`, it creates nothing."""
    path = Path(path)
    if _exists(path, option) and path.is_dir():
        raise BadInputError(f"{option} {path} is a folder; give a file name")
    _check_writable_folder(path.parent, option, path)
    return path
