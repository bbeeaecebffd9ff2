"""Patient metadata that arrives with images at inference: a CSV beside them, or a form's fields.

``dermcam evaluate`` reads a prepared set's own columns (:mod:`dermcam.data.metadata`); ``explain`` and
``serve`` get photos that were never prepared, so their metadata comes from elsewhere:

- a CSV (``explain --metadata FILE``, or a ``metadata.csv`` beside the images): one row per image, an
  image column (the file's name, with or without its extension, or a path ending in it) and any of
  ``age``, ``sex`` and ``site`` (also spelled as the layouts spell them: ``age_approx``,
  ``localization``, ``anatom_site_general``...). It is read by the same reader as ``prepare``'s CSVs
  (:func:`dermcam.data.sources.common.parse_csv`: BOMs, UTF-16, Windows-1252, ``;`` and tab
  separators), so a file prepare reads, explain reads too;
- form fields (``serve``: ``age``, ``sex``, ``site``), checked strictly: a value a person typed that
  is not an age or a sex is a mistake to report, not an unknown to guess.

Both become rows in the columns of a prepared set's index (``age``, ``sex``, ``localization``), so the
one encoder (:func:`dermcam.data.metadata.encode`) turns them into what the model reads. An image
without a row, and every empty cell, is unknown: a model trained with metadata answers it from the
image alone and says so (:func:`image_metadata`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from dermcam.data.sources.common import COLUMN_ALIASES, parse_csv, read_bytes
from dermcam.errors import BadInputError, NotFoundError
from dermcam.metadata_spec import AGE_RANGE, COLUMNS, FIELDS, MAX_SITE_LENGTH, MetadataSpec

DEFAULT_NAME = "metadata.csv"  # looked for beside the images when no file is named
# The column that names each image, first found first (ISIC's ids, a team's own file paths).
IMAGE_COLUMNS = ("image", "image_id", "image_name", "isic_id", "filename", "file_name", "file", "image_path",
                 "path", "filepath", "file_path", "img")
# The column each field is read from, first found first.
FIELD_COLUMNS: dict[str, tuple[str, ...]] = {
    "age": COLUMN_ALIASES["age"],
    "sex": (*COLUMN_ALIASES["sex"], "gender"),
    "site": ("site", *COLUMN_ALIASES["localization"]),
}
_SEXES = {"female": "female", "f": "female", "male": "male", "m": "male", "": "", "unknown": ""}


@dataclass
class MetadataFile:
    """A metadata CSV as read: its rows by the image name each gives (lower-cased; a path's last part),
    the same rows by that name's stem, the fields it has a column for, and notes about its values."""

    path: Path
    fields: tuple[str, ...]
    by_name: dict[str, tuple[dict[str, str], int]] = field(default_factory=dict)  # name -> (row, CSV line)
    by_stem: dict[str, list[tuple[dict[str, str], int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lookup(self, image: Path | str) -> dict[str, str] | None:
        """The row of ``image`` (in the index's columns: age, sex, localization), None when unlisted.

        Matched ignoring case by file name (``a.jpg``), then by the stem a row gives (``ISIC_0001`` names
        ``ISIC_0001.jpg``), then by the stem of the names the rows give. Rows for ``a.jpg`` and ``a.png``
        with different values cannot say which one ``a.tif`` is: a one-line BadInputError."""
        name = PurePosixPath(str(image).replace("\\", "/")).name.lower()
        stem = PurePosixPath(name).stem
        for key in (name, stem):
            if key in self.by_name:
                return self.by_name[key][0]
        candidates = self.by_stem.get(stem, [])
        if len({tuple(row.values()) for row, _ in candidates}) > 1:
            raise BadInputError(f"{self.path}: {PurePosixPath(str(image)).name!r} matches lines "
                                f"{', '.join(str(line) for _, line in candidates)} by its stem, with different "
                                "values; name the images with their extensions")
        return candidates[0][0] if candidates else None


def _first(columns: Iterable[str], candidates: Sequence[str]) -> str | None:
    present = set(columns)
    return next((c for c in candidates if c in present), None)


def read_metadata_csv(path: Path | str, option: str = "--metadata") -> MetadataFile:
    """Read a metadata CSV (see the module docstring); a one-line error naming the file for a file that
    is missing (NotFoundError), empty, not a CSV, without an image column or without any of age, sex
    and site, or that gives one image two different rows (BadInputError)."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{option} {path} is a folder, not a CSV file")
    if not path.is_file():
        raise NotFoundError(f"{option} {path}: no such file")
    label = str(path)
    table, problems = parse_csv(read_bytes(path), label)
    image_column = _first(table.columns, IMAGE_COLUMNS)
    if image_column is None:
        raise BadInputError(f"{label} has no image column ({', '.join(IMAGE_COLUMNS[:4])}, filename...) naming "
                            "each image's file")
    chosen = {f: c for f in FIELDS if (c := _first(table.columns, FIELD_COLUMNS[f])) is not None}
    if not chosen:
        raise BadInputError(f"{label} has none of the columns age, sex, site (or localization, "
                            "anatom_site_general, age_approx); nothing to read")
    result = MetadataFile(path, tuple(chosen), notes=[p.detail for p in problems])
    for line, (cell, row) in enumerate(zip(table[image_column], _rows(table, chosen)), start=2):
        name = PurePosixPath(str(cell).strip().replace("\\", "/")).name.lower()
        if not name:
            continue  # a row that names no image cannot be matched (and harms nothing)
        earlier = result.by_name.get(name)
        if earlier is not None and earlier[0] != row:
            raise BadInputError(f"{label} lists {name!r} on lines {earlier[1]} and {line} with different "
                                "metadata; keep one row per image")
        if earlier is None:
            result.by_name[name] = (row, line)
            result.by_stem.setdefault(PurePosixPath(name).stem, []).append((row, line))
    result.notes += _value_notes(label, table, chosen)
    return result


def _rows(table: pd.DataFrame, chosen: Mapping[str, str]) -> list[dict[str, str]]:
    """Each row's values in the index's columns (age, sex, localization), '' where absent."""
    columns = {COLUMNS[f]: table[c].astype(str).str.strip() if f in chosen else None
               for f, c in ((f, chosen.get(f, "")) for f in FIELDS)}
    return [{name: ("" if values is None else str(values.iat[i])) for name, values in columns.items()}
            for i in range(len(table))]


def _value_notes(label: str, table: pd.DataFrame, chosen: Mapping[str, str]) -> list[str]:
    """One note per field whose non-empty values are not all usable (they are read as unknown)."""
    from dermcam.data.metadata import ages, sexes

    notes = []
    if "age" in chosen:
        cells = table[chosen["age"]].astype(str).str.strip()
        bad = int(((cells != "") & ~np.isfinite(ages(cells))).sum())
        if bad:
            notes.append(f"{label}: {bad} age value(s) are not a number from {AGE_RANGE[0]:g} to {AGE_RANGE[1]:g}; "
                         "read as unknown")
    if "sex" in chosen:
        cells = table[chosen["sex"]].astype(str).str.strip()
        bad = int(((cells != "") & (sexes(cells) == "") & ~cells.str.lower().isin(["unknown", "nan", "na"])).sum())
        if bad:
            notes.append(f"{label}: {bad} sex value(s) are neither female nor male; read as unknown")
    return notes


def frame_of(rows: Sequence[Mapping[str, str] | None]) -> pd.DataFrame:
    """Rows (None: nothing known) as an index-like table in the columns the encoder reads."""
    return pd.DataFrame({COLUMNS[f]: [(row or {}).get(COLUMNS[f], "") for row in rows] for f in FIELDS},
                        dtype=object)


def form_row(age: str | None = None, sex: str | None = None, site: str | None = None) -> dict[str, str] | None:
    """A form's ``age``, ``sex`` and ``site`` as a row (None when all are empty), or a one-line
    BadInputError: an age that is not a number of years from 0 to 120, a sex other than female, male
    (f, m) or unknown, a site with control characters or over 100 characters. A site the model never
    saw is not an error: it is unknown to the model, and the answer says so."""
    values = {"age": (age or "").strip(), "sex": (sex or "").strip(), "site": (site or "").strip()}
    if values["age"]:
        try:
            number = float(values["age"])
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and AGE_RANGE[0] <= number <= AGE_RANGE[1]):
            raise BadInputError(f"age must be a number of years from {AGE_RANGE[0]:g} to {AGE_RANGE[1]:g}, not "
                                f"{values['age'][:20]!r} (leave it empty when unknown)")
    if values["sex"].lower() not in _SEXES:
        raise BadInputError(f"sex must be female, male or unknown (or empty), not {values['sex'][:20]!r}")
    site = values["site"]
    if len(site) > MAX_SITE_LENGTH or not site.isprintable():
        raise BadInputError(f"site must be a plain name of at most {MAX_SITE_LENGTH} characters "
                            "(such as back or lower extremity)")
    if not any(values.values()):
        return None
    return {"age": values["age"], "sex": _SEXES[values["sex"].lower()], "localization": site}


def specs_of(sidecar: Mapping[str, Any]) -> list[MetadataSpec]:
    """The metadata specs of the models that answer: a checkpoint's own, or its ensemble members' (those
    that read metadata); [] for a model without metadata."""
    from dermcam.data.metadata import spec_of

    if sidecar.get("kind") == "ensemble":
        specs = [spec_of(m.get("metadata"), f"ensemble member {m.get('id')}") for m in sidecar.get("members") or []]
    else:
        specs = [spec_of(sidecar.get("metadata"), f"checkpoint {sidecar.get('id')}")]
    return [s for s in specs if s is not None]


def model_fields(sidecar: Mapping[str, Any]) -> list[str]:
    """The fields the model reads (an ensemble: any member), in feature order; [] for none."""
    specs = specs_of(sidecar)
    return [f for f in FIELDS if any(f in s.fields for s in specs)]


def model_sites(sidecar: Mapping[str, Any]) -> list[str]:
    """The sites the model knows (an ensemble: any member's), sorted: what a form offers."""
    return sorted({site for s in specs_of(sidecar) if "site" in s.fields for site in s.sites})


def answered(fields: Sequence[str], known: Sequence[str]) -> str:
    """``answered with age, site (sex unknown)``, ``answered without metadata``, or for a model that
    reads none ``the model reads no metadata``."""
    if not fields:
        return "the model reads no metadata"
    if not known:
        return "answered without metadata"
    unknown = [f for f in fields if f not in known]
    return f"answered with {', '.join(known)}" + (f" ({', '.join(unknown)} unknown)" if unknown else "")


def image_metadata(sidecar: Mapping[str, Any], frame: pd.DataFrame,
                   sources: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """Per row of ``frame``: which fields the model reads, which of them the model got a value for (an
    unusable value, or a site it never saw, is unknown), and in words; ``source``: where the row came
    from (a CSV's path, ``form``), None when nothing was found for the image."""
    from dermcam.data.metadata import known as known_of

    specs = specs_of(sidecar)
    fields = [f for f in FIELDS if any(f in s.fields for s in specs)]
    masks: dict[str, np.ndarray] = {f: np.zeros(len(frame), dtype=bool) for f in fields}
    for spec in specs:
        for name, mask in known_of(spec, frame).items():
            masks[name] |= mask
    out = []
    for i in range(len(frame)):
        known = [f for f in fields if masks[f][i]]
        out.append({"fields": fields, "known": known, "answered": answered(fields, known),
                    "source": None if sources is None else sources[i]})
    return out
