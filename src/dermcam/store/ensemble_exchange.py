"""What an exported ensemble says: its metadata document, where each member's tensors lie, and the
model and sidecar-like dict it loads into.

An exported ensemble is one ``.safetensors`` file: every member's weights under its own prefix
(``members.0.``, ``members.1.``, ...) and, under the header's ``__metadata__["dermcam"]``, one JSON
document (schema ``dermcam.ensemble-export/1``) with the classes, the combination rule, the ensemble's
operating point and, per member, its backbone, preprocessing, calibration, normalised weight, source
checkpoint and a digest of its tensors. Plain timm + safetensors can run it (docs/checkpoints.md)::

    p = sum(member["weight"] * softmax(scale * log softmax(model_i(x_i)) + bias))

where ``x_i`` is the cache image resized to the member's ``input_size`` and normalised with its
mean and std, and (scale, bias) is the member's calibration (1/T and 0 for a temperature).

This module only knows the format. :mod:`dermcam.store.exported` reads and checks the file (size-limited
header parsing, tensor name/shape/dtype checks against the backbones built empty, digests) and
:mod:`dermcam.store.exchange` writes and imports it, for single checkpoints and ensembles alike; both
call this module, which imports neither, so that ``exported.load_exported`` can dispatch on the schema
without an import cycle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dermcam.store import schema as s
from dermcam.store.ensembles import RULE, Ensemble, scoring_document

if TYPE_CHECKING:
    import torch

    from dermcam.models.ensemble import EnsembleModel

ENSEMBLE_EXPORT_SCHEMA = "dermcam.ensemble-export/1"
# The ONNX file's document: the same, without tensor digests, plus the graph (dermcam.deploy.onnx_export).
ENSEMBLE_ONNX_SCHEMA = "dermcam.ensemble-onnx/1"
KIND = "ensemble"
# Weights are normalised on export; a sum this far from 1 means the document was edited.
WEIGHT_TOLERANCE = 1e-6
_PREFIX = re.compile(r"members\.[0-9]{1,3}\.")
# The dtypes an export may store (the keys of dermcam.store.exported.DTYPES, which imports this module).
_DTYPES = ("float32", "float16", "bfloat16")

# The rule in a form that needs no dermcam (informational: the loader applies ``rule`` through
# dermcam.models.ensemble.EnsembleModel).
FORMULA = ("p = sum over members of weight * softmax(scale * log(softmax(model(x))) + bias), where x is the "
           "cache image in [0, 1] resized (antialiased bilinear) to the member's input_size and normalised "
           "with its mean and std; (scale, bias) = (1/temperature, 0) for a temperature calibration, the "
           "calibration's scale and bias for vector scaling, (1, 0) without a calibration")

T = TypeVar("T")


def member_prefix(index: int) -> str:
    """Where member ``index``'s tensors lie in the file: ``members.<index>.<state dict name>``."""
    return f"members.{index}."


MEMBER_META = s.obj({
    "prefix": s.text(_PREFIX, why="is not a member prefix ('members.<n>.')"),
    "backbone": s.BACKBONE,
    "num_classes": s.integer(2, 1000),
    "preprocessing": s.PREPROCESSING,
    "calibration": s.nullable(s.CALIBRATION),
    "weight": s.number(above=0.0),
    "source": s.obj({"id": s.ID, "sha256": s.SHA256}, optional={"epoch": s.EPOCH}),
}, optional={
    "tensors_sha256": s.SHA256,  # required in a safetensors export (checked in _members_fit), absent in ONNX
    "metrics": s.obj(), "monitor": s.MONITOR, "dataset": s.DATASET, "config": s.CONFIG,
    "metadata": s.METADATA,  # a metadata fusion member's encoding (dermcam.metadata_spec)
})


def _members_fit(value: Any, field: str) -> None:
    """How the fields fit together: what the loader relies on, so that no tampered document becomes a
    silently different model (unlike the manifest, the members here must all state a cache size)."""

    def at(key: str) -> str:
        return f"{field}.{key}" if field else key

    classes, members = value["classes"], value["members"]
    prefixes = [m["prefix"] for m in members]
    if len(set(prefixes)) != len(prefixes):
        raise s.Invalid(at("members"), "repeat a prefix")
    for i, member in enumerate(members):
        where = at(f"members[{i}]")
        if member["num_classes"] != len(classes):
            raise s.Invalid(f"{where}.num_classes", f"is not the number of classes ({len(classes)})")
        calibration = member.get("calibration") or {}
        for key in ("scale", "bias"):
            if calibration.get(key) is not None and len(calibration[key]) != len(classes):
                raise s.Invalid(f"{where}.calibration.{key}", f"does not have one entry per class ({len(classes)})")
        if not member["preprocessing"].get("cache_size"):
            raise s.Invalid(f"{where}.preprocessing.cache_size", "is missing")
        if value["schema"] == ENSEMBLE_EXPORT_SCHEMA and "tensors_sha256" not in member:
            raise s.Invalid(f"{where}.tensors_sha256", "is missing")
    total = math.fsum(m["weight"] for m in members)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise s.Invalid(at("members"), f"have weights that sum to {total:.9g}, not 1")
    sizes = {tuple(m["preprocessing"]["cache_size"]) for m in members}
    if len(sizes) > 1:
        raise s.Invalid(at("members"), "do not share one cache size")
    width, height = next(iter(sizes))
    pre = value["preprocessing"]  # dermcam.data.geometry.identity_preprocessing at that size
    if (pre["input_size"] != [3, height, width] or pre["mean"] != [0, 0, 0] or pre["std"] != [1, 1, 1]
            or pre.get("cache_size") != [width, height] or pre.get("color_constancy", "none") != "none"):
        raise s.Invalid(at("preprocessing"), "is not the members' cache image as is (identity at their "
                                             "cache size)")
    point = value.get("operating_point")
    if point is not None and point["class"] not in classes:
        raise s.Invalid(at("operating_point.class"), "is not one of the ensemble's classes")


ENSEMBLE_EXPORT_META = s.all_of(s.obj({
    "schema": s.one_of(ENSEMBLE_EXPORT_SCHEMA, ENSEMBLE_ONNX_SCHEMA),
    "kind": s.one_of(KIND),
    "name": s.NAME,
    "classes": s.CLASSES,
    "rule": s.one_of(RULE),
    "preprocessing": s.PREPROCESSING,
    "members": s.array(MEMBER_META, min_len=1, max_len=100),
    "dtype": s.one_of(*_DTYPES),
}, optional={
    "operating_point": s.nullable(s.OPERATING_POINT),
    "dataset": s.DATASET,
    "formula": s.text(max_len=2000),
    "selection": s.obj(),
    "source": s.obj(optional={"id": s.ID, "created": s.TIMESTAMP}),
    "versions": s.obj(),
    "exported": s.TIMESTAMP,
}), _members_fit)


def is_ensemble_document(meta: Any) -> bool:
    """Whether an export's metadata document (validated or not) claims to be an ensemble's."""
    return isinstance(meta, dict) and meta.get("schema") in (ENSEMBLE_EXPORT_SCHEMA, ENSEMBLE_ONNX_SCHEMA)


def ensemble_document(ensemble: Ensemble, member_docs: Sequence[Mapping[str, Any]], *, dtype: str,
                      digests: Sequence[str] | None, schema: str = ENSEMBLE_EXPORT_SCHEMA) -> dict[str, Any]:
    """The document of an exported ensemble.

    ``member_docs``: each member checkpoint's :func:`dermcam.store.exchange.model_document` (source,
    metrics, config, ...). Preprocessing and calibration are the manifest's, which is what
    ``ensemble:NAME`` applies (a member recalibrated since the ensemble was made keeps the calibration
    it was chosen with). Weights are normalised to sum to 1, as the model applies them.
    ``digests``: each member's :func:`~dermcam.store.exported.tensor_digest` (None in ONNX documents).
    """
    manifest = ensemble.manifest
    identity = scoring_document(ensemble)["preprocessing"]  # what ensemble:NAME takes: the cache image as is
    total = math.fsum(m["weight"] for m in manifest["members"])
    members = []
    for i, (member, doc) in enumerate(zip(manifest["members"], member_docs)):
        source = doc["source"]
        entry: dict[str, Any] = {
            "prefix": member_prefix(i), "backbone": member["backbone"], "num_classes": len(manifest["classes"]),
            "preprocessing": {**member["preprocessing"], "cache_size": list(identity["cache_size"])},
            "calibration": member.get("calibration"),
            "weight": member["weight"] / total,
            "source": {"id": member["id"], "sha256": member["sha256"],
                       **{k: source[k] for k in ("run_id", "epoch", "created", "versions") if k in source}},
            **{k: doc[k] for k in ("metrics", "monitor", "dataset", "config", "pretrained", "metadata") if k in doc},
        }
        if digests is not None:
            entry["tensors_sha256"] = digests[i]
        members.append(entry)
    return {
        "schema": schema, "kind": KIND, "name": ensemble.name, "classes": list(manifest["classes"]),
        "rule": manifest["rule"], "formula": FORMULA, "preprocessing": identity,
        "operating_point": manifest.get("operating_point"), "dataset": manifest.get("dataset") or {},
        "selection": manifest.get("selection") or {}, "members": members, "dtype": dtype,
        "source": {"id": ensemble.id, "created": manifest.get("created")},
        "versions": member_docs[0]["versions"], "exported": member_docs[0]["exported"],
    }


def split_members(entries: Mapping[str, T], meta: Mapping[str, Any]) -> tuple[list[dict[str, T]], list[str]]:
    """(per member, its entries with the prefix removed; names under no member's prefix).

    Used on the header (names -> shapes and dtypes) before anything is loaded, and on the tensors.
    Prefixes end with a dot and differ, so no name can fall under two of them.
    """
    prefixes = [m["prefix"] for m in meta["members"]]
    groups: list[dict[str, T]] = [{} for _ in prefixes]
    strays = []
    for name, value in entries.items():
        for group, prefix in zip(groups, prefixes):
            if name.startswith(prefix):
                group[name[len(prefix):]] = value
                break
        else:
            strays.append(name)
    return groups, sorted(strays)


def ensemble_model(meta: Mapping[str, Any], models: Sequence[torch.nn.Module], *,
                   calibrated: bool = True) -> EnsembleModel:
    """The :class:`~dermcam.models.ensemble.EnsembleModel` a validated document describes (eval mode):
    the same model ``ensemble:NAME`` loads, from the file's members."""
    from dermcam.models.ensemble import EnsembleModel, MemberSpec

    specs = [MemberSpec(m["preprocessing"], m.get("calibration"), m["weight"]) for m in meta["members"]]
    return EnsembleModel(models, specs, calibrated=calibrated).eval()


def ensemble_info(meta: Mapping[str, Any], path: Path, file_sha256: str) -> dict[str, Any]:
    """The sidecar-like dict inference commands read, shaped as
    :func:`dermcam.store.ensembles.scoring_document` (kind, members, identity preprocessing at the cache
    size, calibration applied inside by the members), plus what identifies the file."""
    source = meta.get("source") or {}
    members = meta["members"]
    return {
        "id": path.name, "kind": KIND, "name": meta["name"], "classes": list(meta["classes"]),
        "backbone": "ensemble(" + "+".join(m["backbone"] for m in members) + ")",
        "preprocessing": dict(meta["preprocessing"]), "dataset": meta.get("dataset") or {},
        "calibration": {"method": "members", "temperature": None},
        "operating_point": meta.get("operating_point"),
        "members": [{"id": m["source"]["id"], "sha256": m["source"]["sha256"], "backbone": m["backbone"],
                     "weight": m["weight"], "input_size": m["preprocessing"]["input_size"],
                     "calibration": m.get("calibration"),
                     **({"metadata": m["metadata"]} if m.get("metadata") is not None else {})} for m in members],
        "rule": meta["rule"],
        "weights": {"file": str(path), "sha256": file_sha256, "size": path.stat().st_size},
        "schema": meta["schema"], "dtype": meta["dtype"], "source_id": source.get("id"), "sha256": file_sha256,
        "path": str(path), "selection": meta.get("selection") or {}, "versions": meta.get("versions") or {},
        "exported": meta.get("exported"), "created": source.get("created"),
    }
