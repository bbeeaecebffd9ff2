"""Patient metadata of a prepared set's rows -> the float32 matrix a metadata model reads.

The fields, their encoding and why the diagnosis method is never one of them are
:mod:`dermcam.metadata_spec`. This module fits a :class:`~dermcam.metadata_spec.MetadataSpec` on the
training rows (age mean and std, site vocabulary) and encodes any rows with it: training's, validation's,
another set's at ``evaluate``. It reads only the columns the spec's fields name (``age``, ``sex``,
``localization``), selected before anything else is looked at, so no other column of the index (above
all ``dx_type``) can reach the features. numpy and pandas only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dermcam.data.classes import UNKNOWN_LABELS
from dermcam.data.sources.common import MISSING_VALUES
from dermcam.metadata_spec import AGE_RANGE, COLUMNS, MAX_SITE_LENGTH, MAX_SITES, SEXES, MetadataSpec, parse_fields

__all__ = ["MetadataSpec", "fit_spec", "encode", "known", "model_metadata", "summary", "spec_of"]

_SEX_SPELLINGS = {"female": "female", "f": "female", "male": "male", "m": "male"}
_SPACES = re.compile(r"[\s_]+")


def _columns(index: pd.DataFrame, fields: Sequence[str]) -> dict[str, pd.Series]:
    """The one column each field reads, as stripped strings ('' where absent): the only access to
    ``index`` this module makes."""
    out = {}
    for field in fields:
        column = COLUMNS[field]
        values = index[column] if column in index.columns else pd.Series([""] * len(index), index=index.index)
        out[field] = values.fillna("").astype(str).str.strip().reset_index(drop=True)
    return out


def ages(values: pd.Series) -> np.ndarray:
    """Ages as float64, NaN where unknown: not a number, not finite, or outside 0-120."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(numbers) & (numbers >= AGE_RANGE[0]) & (numbers <= AGE_RANGE[1])
    return np.where(ok, numbers, np.nan)


def sexes(values: pd.Series) -> np.ndarray:
    """female / male (also f, m in any case), '' for anything else."""
    return values.str.lower().map(_SEX_SPELLINGS).fillna("").to_numpy(dtype=object)


def sites(values: pd.Series) -> np.ndarray:
    """Sites lower-cased with runs of spaces and underscores made one space; '' when missing or unknown."""
    text = values.str.lower().str.replace(_SPACES, " ", regex=True).str.strip()
    unknown = text.isin(MISSING_VALUES | UNKNOWN_LABELS) | (text.str.len() > MAX_SITE_LENGTH) | \
        ~text.map(str.isprintable)
    return text.where(~unknown, "").to_numpy(dtype=object)


def fit_spec(fields: str | Sequence[str], index: pd.DataFrame) -> MetadataSpec:
    """The spec for ``fields`` (``"age,sex,site"`` or a sequence) fitted on the training rows ``index``:
    the mean and std of their known ages, and the sites they have (sorted; at most
    :data:`~dermcam.metadata_spec.MAX_SITES`, the most frequent). Rows of any other split must not
    be passed: the vocabulary is part of what the model learned."""
    chosen = parse_fields(fields if isinstance(fields, str) else ",".join(fields))
    columns = _columns(index, chosen)
    mean, std, vocabulary = 50.0, 20.0, ()
    if "age" in chosen:
        known_ages = ages(columns["age"])
        known_ages = known_ages[np.isfinite(known_ages)]
        if len(known_ages):
            mean = round(float(known_ages.mean()), 6)
            std = round(max(float(known_ages.std()), 1.0), 6)  # one age, or all alike: scale 1, not 0
    if "site" in chosen:
        found = pd.Series(sites(columns["site"]))
        counts = found[found != ""].value_counts()
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SITES]
        vocabulary = tuple(sorted(site for site, _ in top))
    return MetadataSpec(chosen, mean, std, vocabulary)


def encode(spec: MetadataSpec, index: pd.DataFrame) -> np.ndarray:
    """(N, spec.dim) float32 features of the rows of ``index`` (any set: unknown values, and sites the
    spec never saw, become the unknown entries)."""
    columns = _columns(index, spec.fields)
    n = len(index)
    parts: list[np.ndarray] = []
    if "age" in spec.fields:
        age = ages(columns["age"])
        missing = ~np.isfinite(age)
        scaled = np.where(missing, 0.0, (np.nan_to_num(age) - spec.age_mean) / spec.age_std)
        parts += [scaled[:, None], missing[:, None].astype(np.float64)]
    if "sex" in spec.fields:
        parts.append(_one_hot(sexes(columns["sex"]), SEXES, n))
    if "site" in spec.fields:
        parts.append(_one_hot(sites(columns["site"]), spec.sites, n))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32) if parts else \
        np.zeros((n, 0), dtype=np.float32)


def _one_hot(values: np.ndarray, vocabulary: Sequence[str], n: int) -> np.ndarray:
    """One column per vocabulary entry plus a last one for everything else (unknown)."""
    position = {v: i for i, v in enumerate(vocabulary)}
    out = np.zeros((n, len(vocabulary) + 1), dtype=np.float64)
    out[np.arange(n), [position.get(v, len(vocabulary)) for v in values]] = 1.0
    return out


def known(spec: MetadataSpec, index: pd.DataFrame) -> dict[str, np.ndarray]:
    """For each of the spec's fields, which rows the model gets a value for (an unseen site counts as
    unknown: the model sees nothing of it)."""
    columns = _columns(index, spec.fields)
    out: dict[str, np.ndarray] = {}
    if "age" in spec.fields:
        out["age"] = np.isfinite(ages(columns["age"]))
    if "sex" in spec.fields:
        out["sex"] = sexes(columns["sex"]) != ""
    if "site" in spec.fields:
        out["site"] = np.isin(sites(columns["site"]), list(spec.sites))
    return out


def spec_of(value: Mapping[str, Any] | None, where: str = "metadata") -> MetadataSpec | None:
    """A recorded spec (a sidecar's ``metadata``) as a MetadataSpec, None when there is none."""
    return None if value is None else MetadataSpec.from_dict(value, where)


def _member_specs(sidecar: Mapping[str, Any]) -> list[MetadataSpec | None]:
    """One spec (or None) per model that answers: a checkpoint's own, or each ensemble member's."""
    if sidecar.get("kind") == "ensemble":
        return [spec_of(m.get("metadata"), f"ensemble member {m.get('id')}") for m in sidecar.get("members") or []]
    return [spec_of(sidecar.get("metadata"), f"checkpoint {sidecar.get('id')}")]


def model_metadata(sidecar: Mapping[str, Any], index: pd.DataFrame) -> np.ndarray | list[np.ndarray | None] | None:
    """What :func:`dermcam.evaluate.predict.predict` passes the model for the rows of ``index``: None for
    a model without metadata; for a checkpoint with it, its (N, D) features; for an ensemble whose members
    use metadata, one entry per member (None for those that do not; members may have other vocabularies)."""
    specs = _member_specs(sidecar)
    if all(s is None for s in specs):
        return None
    encoded = [None if s is None else encode(s, index) for s in specs]
    return encoded if sidecar.get("kind") == "ensemble" else encoded[0]


def summary(sidecar: Mapping[str, Any], index: pd.DataFrame) -> dict[str, Any] | None:
    """What evaluate reports of the metadata: the fields the model uses (an ensemble: any member), how
    many of the scored images had each, and how many had none of them. None for a model without metadata."""
    specs = [s for s in _member_specs(sidecar) if s is not None]
    if not specs:
        return None
    fields = [f for f in ("age", "sex", "site") if any(f in s.fields for s in specs)]
    per_field: dict[str, np.ndarray] = {}
    for spec in specs:
        for field, mask in known(spec, index).items():
            per_field[field] = per_field.get(field, np.zeros(len(index), dtype=bool)) | mask
    any_known = np.zeros(len(index), dtype=bool)
    for mask in per_field.values():
        any_known |= mask
    return {"fields": fields, "images": int(len(index)), "known": {f: int(per_field[f].sum()) for f in fields},
            "without_metadata": int((~any_known).sum())}
