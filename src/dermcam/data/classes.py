"""Class codes: which diagnoses dermcam knows and how a chosen set becomes labels (alphabetical order)."""

from __future__ import annotations

from collections.abc import Iterable

from dermcam.errors import BadInputError

CLASS_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


DEFAULT_CLASSES = ("nv", "bkl", "mel")


def check_classes(classes: Iterable[str]) -> list[str]:
    """The chosen class codes in label order (alphabetical), or BadInputError."""
    chosen = sorted({c.strip().lower() for c in classes if c.strip()})
    unknown = [c for c in chosen if c not in CLASS_CODES]
    if unknown:
        raise BadInputError(f"unknown class code(s) {', '.join(unknown)}; choose from {', '.join(CLASS_CODES)}")
    if len(chosen) < 2:
        raise BadInputError("choose at least two classes (for example nv,bkl,mel)")
    return chosen
