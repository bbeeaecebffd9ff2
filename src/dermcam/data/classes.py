"""Class names: how a label in a source becomes a class, which classes a set keeps, and the label order.

Class names are free (a team's own diagnoses, not only HAM10000's seven codes): a label is stripped,
lower-cased and its inner spaces become ``_`` (``"Basal cell carcinoma"`` -> ``basal_cell_carcinoma``),
and must then be a plain name (letters in any script, digits, ``_ - +``, 1-40 characters: ``mélanome``
is one). Labels are the chosen names sorted alphabetically, numbered from 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from dermcam.errors import BadInputError

CLASS_CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # HAM10000's seven codes


DEFAULT_CLASSES = ("nv", "bkl", "mel")


# Labels that say "no diagnosis" (ISIC's UNK column, ISIC 2020's "unknown"): such rows are skipped.
UNKNOWN_LABELS = frozenset({"unk", "unknown"})


# \w is Unicode-aware: letters and digits of any script (é, ß, ø, ...) and "_"; no punctuation, no
# spaces, no control or formatting characters (a right-to-left override cannot hide in a name).
_PLAIN = re.compile(r"[\w+-]{1,40}")


def normalise_class(label: str) -> str:
    """``" Basal cell  carcinoma "`` -> ``"basal_cell_carcinoma"``: stripped, lower-cased, spaces as ``_``,
    and in Unicode's composed form (NFC), so ``mélanome`` typed in a CSV and ``mélanome`` read from a
    macOS folder name (decomposed: ``e`` + a combining accent) are one class."""
    return re.sub(r"\s+", "_", unicodedata.normalize("NFC", str(label)).strip().lower())


def is_plain_name(name: str) -> bool:
    """A usable class name (after :func:`normalise_class`); ``fullmatch``: ``$`` would accept a newline."""
    return bool(_PLAIN.fullmatch(name))


def check_class_names(classes: Iterable[str]) -> list[str]:
    """The ``--classes`` names, normalised, in label order (alphabetical), or BadInputError.

    Whether the source has them is checked once it is read (:func:`choose_classes`).
    """
    chosen = sorted({normalise_class(c) for c in classes if str(c).strip()})
    bad = [c for c in chosen if not is_plain_name(c)]
    if bad:
        raise BadInputError(f"unknown class code(s) {', '.join(repr(c) for c in bad)}: a class is 1-40 letters, "
                            "digits, '_', '-' or '+'")
    if len(chosen) < 2:
        raise BadInputError("choose at least two classes (for example nv,bkl,mel)")
    return chosen


def choose_classes(requested: list[str] | None, found: Iterable[str]) -> tuple[list[str], str]:
    """The classes to keep, in label order, and how they were chosen (``option``, ``default`` or ``found``).

    ``requested`` None: nv, bkl and mel when the source has all three, else every class it has.
    """
    present = sorted(set(found))
    if requested is not None:
        unknown = [c for c in requested if c not in present]
        if unknown:
            raise BadInputError(f"unknown class code(s) {', '.join(unknown)}: the source has "
                                f"{', '.join(present) or 'no usable class'}")
        return list(requested), "option"
    if set(DEFAULT_CLASSES) <= set(present):
        return sorted(DEFAULT_CLASSES), "default"
    if len(present) < 2:
        raise BadInputError(f"the source has {len(present)} usable class{'es' if len(present) != 1 else ''} "
                            f"({', '.join(present) or 'none'}); a classifier needs at least two")
    return present, "found"

