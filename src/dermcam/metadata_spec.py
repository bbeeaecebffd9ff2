"""Patient metadata a model may fuse with the image: which fields exist, and the encoding a model records.

Three fields, each read from one column of a prepared set's ``index.csv`` (which every layout fills
from its own names: HAM10000's ``localization``, ISIC's ``anatom_site_general``, ...):

- ``age``: ``(age - mean) / std`` with the training rows' mean and std, plus a flag that is 1 when the
  age is unknown (its scaled value is then 0, the training mean). An age that is not a number from
  0 to 120 is unknown.
- ``sex``: one-hot over female, male and unknown.
- ``site``: one-hot over the sites of the training rows, plus unknown; a site never seen in training
  (another clinic's vocabulary, a typo) is unknown at inference.

Unknown is a normal value, never an error: a model trained with metadata answers an image with none
(its "all unknown" row, :meth:`MetadataSpec.unknown`), and says so.

**Never** the diagnosis method (``dx_type``: histo, follow_up, consensus, confocal): it is decided by the
diagnosis itself (follow-up images are almost all nevi, every melanoma is histopathology), so a model
fed it learns the label from the answer sheet. :func:`parse_fields` refuses it, and the encoder reads
only the columns of :data:`COLUMNS`.

A :class:`MetadataSpec` is what a checkpoint's sidecar records as ``"metadata": {...}`` (JSON): the
fields, the age scaling, the site vocabulary and the feature count. It sits at the top of the package,
beside ``errors``, because three layers that may not import each other read it: ``data`` encodes rows
with it, ``models`` builds the network for its feature count, and the store validates sidecars with
:func:`spec_problem`. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dermcam.errors import BadInputError, CorruptError

ENCODING = "dermcam.metadata/1"
FIELDS: tuple[str, ...] = ("age", "sex", "site")  # in the order of the feature vector
COLUMNS: dict[str, str] = {"age": "age", "sex": "sex", "site": "localization"}  # index.csv column of each
SEXES: tuple[str, ...] = ("female", "male")
AGE_RANGE = (0.0, 120.0)  # outside it an age is a typo or a code (999), so unknown
HIDDEN = 32  # width of the metadata network's two layers
DROPOUT = 0.1
MAX_SITES = 200  # vocabulary cap: a site column with more values is not an anatomical site
MAX_SITE_LENGTH = 100

# Names that leak the label: the diagnosis method (and its ISIC spelling), and the diagnosis itself.
LEAKING: dict[str, str] = {
    "dx_type": "the diagnosis method",
    "diagnosis_confirm_type": "the diagnosis method",
    "diagnosis_method": "the diagnosis method",
    "method": "the diagnosis method",
    "dx": "the diagnosis (the label itself)",
    "diagnosis": "the diagnosis (the label itself)",
    "label": "the label itself",
}


def parse_fields(text: str, option: str = "--metadata") -> tuple[str, ...]:
    """``"age,sex,site"`` -> the fields in feature order; a one-line BadInputError for anything else.

    The diagnosis method (``dx_type``) and the diagnosis are refused by name, saying why: they leak the
    label. Unknown names, repeated names and an empty list are refused too.
    """
    if not isinstance(text, str):
        raise BadInputError(f"{option} must be text such as age,sex,site, not {type(text).__name__}")
    names = [part.strip().lower().replace(" ", "_") for part in text.split(",")]
    if not any(names):
        raise BadInputError(f"{option} is empty; give fields from {', '.join(FIELDS)} (e.g. age,sex,site)")
    for name in names:
        if name in LEAKING:
            raise BadInputError(f"{option} {name} is refused: {LEAKING[name]} leaks the label (follow-up images "
                                f"are nearly all nv, every melanoma is histo); use {', '.join(FIELDS)}")
        if name not in FIELDS:
            shown = repr(name[:40]) if name else "'' (an empty field)"
            raise BadInputError(f"{option}: {shown} is not a metadata field; choose from {', '.join(FIELDS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BadInputError(f"{option} names {', '.join(repeated)} more than once")
    return tuple(f for f in FIELDS if f in names)


@dataclass(frozen=True)
class MetadataSpec:
    """How a model's metadata input is made: its fields, age scaling and site vocabulary (JSON in sidecars)."""

    fields: tuple[str, ...]
    age_mean: float = 50.0
    age_std: float = 20.0
    sites: tuple[str, ...] = ()
    hidden: int = HIDDEN
    dropout: float = DROPOUT

    @property
    def features(self) -> list[str]:
        """The name of every entry of the encoded vector, in order."""
        names: list[str] = []
        if "age" in self.fields:
            names += ["age", "age=unknown"]
        if "sex" in self.fields:
            names += [f"sex={s}" for s in SEXES] + ["sex=unknown"]
        if "site" in self.fields:
            names += [f"site={s}" for s in self.sites] + ["site=unknown"]
        return names

    @property
    def dim(self) -> int:
        return len(self.features)

    def unknown(self) -> list[float]:
        """The encoding of a row with nothing known: what the model sees for an image without metadata."""
        return [1.0 if name.endswith("unknown") else 0.0 for name in self.features]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoding": ENCODING, "fields": list(self.fields),
                               "columns": {f: COLUMNS[f] for f in self.fields}}
        if "age" in self.fields:
            out["age"] = {"mean": self.age_mean, "std": self.age_std, "range": list(AGE_RANGE)}
        if "sex" in self.fields:
            out["sex"] = list(SEXES)
        if "site" in self.fields:
            out["sites"] = list(self.sites)
        out.update(features=self.features, dim=self.dim, hidden=self.hidden, dropout=self.dropout)
        return out

    @classmethod
    def from_dict(cls, value: Any, where: str = "metadata") -> MetadataSpec:
        """The spec a sidecar records; CorruptError (exit 4) naming ``where`` when it is damaged."""
        problem = spec_problem(value)
        if problem is not None:
            raise CorruptError(f"{where}: {problem} (damaged or modified)")
        return _build(value)


def _build(value: Mapping[str, Any]) -> MetadataSpec:
    fields = tuple(value["fields"])
    age = value.get("age") or {}
    return MetadataSpec(fields, float(age.get("mean", 50.0)), float(age.get("std", 20.0)),
                        tuple(value.get("sites") or ()), int(value["hidden"]), float(value.get("dropout", DROPOUT)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _site_ok(site: Any) -> bool:
    return (isinstance(site, str) and 0 < len(site) <= MAX_SITE_LENGTH and site == site.strip()
            and site.isprintable())


def spec_problem(value: Any) -> str | None:
    """What is wrong with a recorded spec (a sidecar's ``metadata`` block), or None when it is usable.

    Everything that changes an encoded row or the network's shape is checked: the fields, the age
    scaling (finite, a positive std), the sexes, the site vocabulary (plain names, once each), the
    feature count (must be what the fields and sites make) and the hidden width.
    """
    if not isinstance(value, dict):
        return "the metadata block is not a JSON object"
    if value.get("encoding") != ENCODING:
        return f"metadata encoding {str(value.get('encoding'))[:40]!r} is not {ENCODING}"
    fields = value.get("fields")
    if (not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields)
            or list(fields) != [f for f in FIELDS if f in fields]):
        return f"metadata fields are not a list of {', '.join(FIELDS)} (in that order, each once)"
    if "age" in fields:
        age = value.get("age")
        if (not isinstance(age, dict) or not _is_number(age.get("mean")) or not _is_number(age.get("std"))
                or not age["std"] > 0):
            return "metadata age is not a finite mean and a positive std"
    if "sex" in fields and value.get("sex") != list(SEXES):
        return f"metadata sex is not {list(SEXES)}"
    if "site" in fields:
        sites = value.get("sites")
        if (not isinstance(sites, list) or len(sites) > MAX_SITES or not all(map(_site_ok, sites))
                or len(set(sites)) != len(sites)):
            return f"metadata sites are not a list of at most {MAX_SITES} distinct site names"
    hidden = value.get("hidden")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= 4096:
        return "metadata hidden is not a whole number from 1 to 4096"
    dropout = value.get("dropout", DROPOUT)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        return "metadata dropout is not a number in [0, 1)"
    spec = _build(value)
    if value.get("dim") != spec.dim:
        return f"metadata dim {str(value.get('dim'))[:20]} is not the {spec.dim} features its fields and sites make"
    if "features" in value and value["features"] != spec.features:
        return "metadata features do not match its fields and sites"
    return None


def fields_of(value: Mapping[str, Any] | None) -> list[str]:
    """The fields a recorded spec uses ([] for None): what reports say a model reads."""
    return list((value or {}).get("fields") or [])


def describe_fields(fields: Sequence[str]) -> str:
    return ", ".join(fields) if fields else "none"
