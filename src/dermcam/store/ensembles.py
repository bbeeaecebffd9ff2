"""Ensembles in the store: ``ensembles/<name>.json``, a small manifest naming member checkpoints.

No weights are copied: a manifest names each member by checkpoint id *and* the sha256 of its weights,
and records what the member needs to answer as it did when the ensemble was made (its preprocessing
and calibration). Loading checks all of it, so a member that was deleted, replaced or damaged since
is a one-line error, never a silently different answer. ``ckpt prune`` asks :func:`members_in_use`
before it deletes anything.

The scoring side (combining the members, choosing them on validation) is in
:mod:`dermcam.evaluate.ensemble`; the model that runs them is :class:`dermcam.models.ensemble.EnsembleModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError, CorruptError, DermcamError, NotFoundError
from dermcam.store import schema as s
from dermcam.store.checkpoint import Checkpoint, read_json_document
from dermcam.store.files import atomic_write_json, utc_now
from dermcam.store.locks import store_lock
from dermcam.store.paths import PLAIN_NAME, contained, ensembles_dir

ENSEMBLE_SCHEMA = "dermcam.ensemble/1"
PREFIX = "ensemble:"  # how a user names an ensemble wherever a checkpoint is accepted
RULE = "mean of calibrated probabilities"
RESERVED = frozenset({"best", "latest"})
DEFAULT_CACHE_SIZE = (256, 192)  # dermcam.data.geometry's: members saved before cache_size was recorded

# A member is named by its store id, RUN:EPOCH, never by a path: a manifest must not lead a command
# to read a checkpoint outside the store.
MEMBER = s.obj({
    "id": s.CHECKPOINT_ID,
    "sha256": s.SHA256,
    "backbone": s.BACKBONE,
    "preprocessing": s.PREPROCESSING,
    "weight": s.number(above=0.0),
}, optional={"calibration": s.nullable(s.CALIBRATION), "monitor": s.MONITOR})


def _members_agree(value: Any, field: str) -> None:
    """Every member decodes the same cache image, and the operating point's class exists."""
    sizes = {tuple(m["preprocessing"].get("cache_size") or ()) for m in value["members"]}
    if len(sizes) > 1:
        raise s.Invalid(f"{field}.members", "do not share one cache size")
    for m in value["members"]:
        calibration = m.get("calibration") or {}
        for key in ("scale", "bias"):
            if calibration.get(key) is not None and len(calibration[key]) != len(value["classes"]):
                raise s.Invalid(f"{field}.members", f"member {m['id']}: calibration {key} does not fit the classes")
    point = value.get("operating_point")
    if point is not None and point["class"] not in value["classes"]:
        raise s.Invalid(f"{field}.operating_point.class", "is not one of the ensemble's classes")


MANIFEST = s.all_of(s.obj({
    "schema": s.one_of(ENSEMBLE_SCHEMA),
    "name": s.NAME,
    "classes": s.CLASSES,
    "rule": s.one_of(RULE),
    "members": s.array(MEMBER, min_len=1, max_len=100),
}, optional={
    "created": s.TIMESTAMP,
    "dataset": s.DATASET,
    "operating_point": s.nullable(s.OPERATING_POINT),
    "selection": s.obj(),
}), _members_agree)


@dataclass(frozen=True)
class Ensemble:
    """A validated manifest and where it lies."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def id(self) -> str:
        return PREFIX + self.name

    @property
    def member_ids(self) -> list[str]:
        return [m["id"] for m in self.manifest["members"]]


def check_name(name: str) -> str:
    """A new ensemble's name: a plain name that no checkpoint reference could be mistaken for."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or name in RESERVED:
        raise BadInputError(f"ensemble name {name!r} must be a plain name (letters, digits, . _ + -), "
                            f"not {' or '.join(sorted(RESERVED))}")
    return name


def check_new_name(name: str, root: Path | None = None) -> str:
    """:func:`check_name`, and not a reference to a checkpoint now (a run id or its prefix, a weights hash
    prefix): a bare NAME is looked up as an ensemble first, so such an ensemble would silently answer
    for that checkpoint."""
    from dermcam.store.references import resolve

    check_name(name)
    if name.endswith((".json", ".safetensors")):  # resolve would take it for a file path
        return name
    try:
        ckpt = resolve(name, root)
    except NotFoundError:
        return name
    except DermcamError as exc:  # an ambiguous run prefix, a damaged checkpoint: a reference all the same
        raise BadInputError(f"ensemble name '{name}' is already a checkpoint reference ({exc}); choose "
                            "another name") from None
    raise BadInputError(f"ensemble name '{name}' already names checkpoint {ckpt.id} (a run id or weights "
                        "hash prefix); choose another name")


def ensemble_name(ref: object, root: Path | None = None) -> str | None:
    """The ensemble a checkpoint reference names (``ensemble:NAME``, or a bare NAME with a manifest), else None."""
    if ref is None or isinstance(ref, Path):
        return None
    text = str(ref)
    if text.startswith(PREFIX):
        return text[len(PREFIX):]
    if PLAIN_NAME.fullmatch(text) and (ensembles_dir(root) / f"{text}.json").is_file():
        return text
    return None


def manifest_path(name: str, root: Path | None = None, *, typed: bool = True) -> Path:
    error = BadInputError if typed else CorruptError
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise error(f"ensemble name {name!r} is not a plain name")
    # the name is plain, so only a symlink in the store can lead outside it: damage, not bad input
    return contained(ensembles_dir(root), f"{name}.json", "ensemble", CorruptError)


def read_ensemble(name: str, root: Path | None = None) -> Ensemble:
    """A stored ensemble, validated; NotFoundError (listing what there is) or CorruptError."""
    path = manifest_path(name, root)
    if not path.is_file():
        names = [e.name for e in scan_ensembles(root)[0]]
        known = f"; the store has {', '.join(names)}" if names else "; create one with: dermcam ensemble create"
        raise NotFoundError(f"no ensemble '{name}'{known}")
    manifest = read_json_document(path, MANIFEST, "ensemble manifest")
    if manifest["name"] != name:
        raise CorruptError(f"{path} names ensemble '{manifest['name']}', not '{name}' (damaged or modified)")
    return Ensemble(path, manifest)


@dataclass(frozen=True)
class DamagedEnsemble:
    path: Path
    problem: str


def scan_ensembles(root: Path | None = None) -> tuple[list[Ensemble], list[DamagedEnsemble]]:
    """Every valid ensemble (by name) and every manifest that is not (listed, never followed)."""
    base = ensembles_dir(root)
    found: list[Ensemble] = []
    damaged: list[DamagedEnsemble] = []
    for path in sorted(base.glob("*.json")) if base.is_dir() else []:
        try:
            contained(base, path.name, "ensemble")
            manifest = read_json_document(path, MANIFEST, "ensemble manifest")
            if f"{manifest['name']}.json" != path.name:
                raise CorruptError(f"{path} names ensemble '{manifest['name']}' (damaged or modified)")
            found.append(Ensemble(path, manifest))
        except CorruptError as exc:
            damaged.append(DamagedEnsemble(path, str(exc)))
    return found, damaged


def member_record(ckpt: Checkpoint, weight: float) -> dict[str, Any]:
    """What a manifest keeps of one member checkpoint."""
    sidecar = ckpt.sidecar
    record = {"id": ckpt.id, "sha256": sidecar["weights"]["sha256"], "backbone": sidecar["backbone"],
              "preprocessing": sidecar["preprocessing"], "weight": float(weight),
              "calibration": sidecar.get("calibration")}
    if sidecar.get("monitor"):
        record["monitor"] = sidecar["monitor"]
    return record


def check_members(ckpts: list[Checkpoint]) -> None:
    """Members must agree on the class order and on the cache image they decode; one line otherwise."""
    if not ckpts:
        raise BadInputError("an ensemble needs at least one member checkpoint")
    ids = [c.id for c in ckpts]
    if len(set(ids)) != len(ids):
        raise BadInputError("a checkpoint is named twice; give each member once (use --weights to weigh one more)")
    first = ckpts[0]
    for ckpt in ckpts[1:]:
        if list(ckpt.sidecar["classes"]) != list(first.sidecar["classes"]):
            raise BadInputError(f"members disagree on the classes: {first.id} has "
                                f"{', '.join(first.sidecar['classes'])}, {ckpt.id} has "
                                f"{', '.join(ckpt.sidecar['classes'])}")
        if _cache(ckpt) != _cache(first):
            raise BadInputError(f"members were trained on different image caches: {first.id} on {_cache(first)}, "
                                f"{ckpt.id} on {_cache(ckpt)}; an ensemble's members must see the same image")


def _cache(ckpt: Checkpoint) -> list[int] | None:
    size = ckpt.sidecar["preprocessing"].get("cache_size")
    return list(size) if size else None


def new_manifest(name: str, ckpts: list[Checkpoint], weights: list[float], *,
                 operating_point: dict[str, Any] | None = None,
                 selection: dict[str, Any] | None = None, root: Path | None = None) -> Ensemble:
    """An ensemble of ``ckpts`` in memory (validated, not yet stored): score it, then :func:`save_ensemble`."""
    check_new_name(name, root)
    check_members(ckpts)
    if len(weights) != len(ckpts) or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise BadInputError(f"--weights needs {len(ckpts)} positive finite numbers, one per member")
    first = ckpts[0].sidecar
    manifest: dict[str, Any] = {
        "schema": ENSEMBLE_SCHEMA, "name": name, "created": utc_now(), "classes": list(first["classes"]),
        "rule": RULE, "members": [member_record(c, w) for c, w in zip(ckpts, weights)],
        "dataset": first.get("dataset") or {}, "operating_point": operating_point, "selection": selection or {},
    }
    s.validate(manifest, MANIFEST, f"ensemble {name}")
    return Ensemble(manifest_path(name, root), manifest)


def save_ensemble(ensemble: Ensemble, *, replace: bool = False, root: Path | None = None) -> Ensemble:
    """Write the manifest atomically under the store lock (see :func:`write_manifest`)."""
    with store_lock("store", root=root):
        return write_manifest(ensemble, replace=replace, root=root)


def write_manifest(ensemble: Ensemble, *, replace: bool = False, root: Path | None = None) -> Ensemble:
    """Write the manifest atomically after checking that every member is still there; the caller holds
    the store lock. A prune holds the same lock, so it cannot run between that check and the manifest
    (which protects the members) appearing."""
    from dermcam.store.references import resolve

    name = ensemble.name
    path = manifest_path(name, root)
    if path.exists() and not replace:
        raise BadInputError(f"ensemble '{name}' exists; choose another name or add --replace")
    for member in ensemble.manifest["members"]:
        ckpt = resolve(member["id"], root)
        if ckpt.sidecar["weights"]["sha256"] != member["sha256"]:
            raise CorruptError(f"checkpoint {member['id']} changed while the ensemble was being made")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, ensemble.manifest)
    return Ensemble(path, ensemble.manifest)


def remove_ensemble(name: str, root: Path | None = None) -> Path:
    """Delete the manifest only: the member checkpoints stay (prune may take them afterwards)."""
    path = manifest_path(name, root)
    with store_lock("store", root=root):
        if not path.is_file():
            raise NotFoundError(f"no ensemble '{name}'")
        path.unlink()
    return path


def members_in_use(root: Path | None = None) -> dict[str, list[str]]:
    """Checkpoint id -> the ensembles that name it. A damaged manifest protects nothing it cannot name,
    so it is reported by ``ensemble list`` and ``ckpt verify``, and prune says it could not read it."""
    used: dict[str, list[str]] = {}
    for ensemble in scan_ensembles(root)[0]:
        for member in ensemble.member_ids:
            used.setdefault(member, []).append(ensemble.name)
    return used


def member_checkpoints(ensemble: Ensemble, root: Path | None = None) -> list[Checkpoint]:
    """The member checkpoints as they are now, each checked against the manifest (:func:`check_member`):
    a deleted member is NotFoundError; a damaged one, or one that is not what the manifest recorded,
    is CorruptError (the weights' own hash is checked when they are loaded). The one check of "this
    ensemble can answer": loading, ``ensemble list``/``show`` and ``ckpt verify`` all call it."""
    from dermcam.store.references import resolve

    found = []
    for member in ensemble.manifest["members"]:
        try:
            ckpt = resolve(member["id"], root)
        except NotFoundError:
            raise NotFoundError(f"ensemble '{ensemble.name}': member {member['id']} no longer exists "
                                f"(deleted or pruned); remove the ensemble with: dermcam ensemble rm "
                                f"{ensemble.name}") from None
        except CorruptError as exc:
            raise CorruptError(f"ensemble '{ensemble.name}': member {member['id']} is damaged: {exc}") from None
        check_member(ensemble, member, ckpt)
        found.append(ckpt)
    return found


def check_member(ensemble: Ensemble, member: dict[str, Any], ckpt: Checkpoint) -> None:
    """A member checkpoint is the one the manifest recorded: the same weights, backbone and classes (in
    the same order: the ensemble averages probabilities class by class, so a member answering in
    another order would silently average one class's probability into another's)."""
    problem = None
    if ckpt.id != member["id"] or ckpt.sidecar["weights"]["sha256"] != member["sha256"]:
        problem = "is not the checkpoint it was made with (its weights' sha256 differs)"
    elif ckpt.sidecar["backbone"] != member["backbone"]:
        problem = f"has backbone {ckpt.sidecar['backbone']}, the manifest says {member['backbone']}"
    elif list(ckpt.sidecar["classes"]) != list(ensemble.manifest["classes"]):
        problem = (f"has classes {', '.join(ckpt.sidecar['classes'])}, the manifest says "
                   f"{', '.join(ensemble.manifest['classes'])}")
    if problem:
        raise CorruptError(f"ensemble '{ensemble.name}' ({ensemble.path}): member {member['id']} {problem} "
                           "(damaged or modified)")


def unusable_ensembles(root: Path | None = None) -> list[DamagedEnsemble]:
    """Every ensemble that cannot answer because something is damaged: its manifest, or a member
    (:func:`member_checkpoints`). A member deleted on purpose (``prune --force``) is not damage:
    ``ensemble list`` says the ensemble no longer loads."""
    found, damaged = scan_ensembles(root)
    for ensemble in found:
        try:
            member_checkpoints(ensemble, root)
        except CorruptError as exc:
            damaged.append(DamagedEnsemble(ensemble.path, str(exc)))
        except NotFoundError:
            pass
    return damaged


def scoring_document(ensemble: Ensemble) -> dict[str, Any]:
    """The sidecar-like description every command reads for an ensemble (classes, preprocessing,
    calibration, operating point, identity), so evaluate, explain and export treat it like a checkpoint.

    Its ``calibration`` is ``{"method": "members"}``: each member's own calibration is applied inside
    the ensemble, before the mean, so nothing is applied after it.
    """
    manifest = ensemble.manifest
    members = manifest["members"]
    width, height = (int(v) for v in members[0]["preprocessing"].get("cache_size") or DEFAULT_CACHE_SIZE)
    # dermcam.data.geometry.identity_preprocessing, written out: the store may not import data (data
    # imports the store; tests/test_architecture.py), and tests/test_ensemble.py checks the two agree
    identity = {"input_size": [3, height, width], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                "cache_size": [width, height], "interpolation": "bilinear", "resize": "none"}
    return {
        "id": ensemble.id, "kind": "ensemble", "name": ensemble.name, "classes": list(manifest["classes"]),
        "backbone": "ensemble(" + "+".join(m["backbone"] for m in members) + ")",
        "preprocessing": identity, "dataset": manifest.get("dataset") or {},
        "calibration": {"method": "members", "temperature": None},
        "operating_point": manifest.get("operating_point"),
        "members": [{**{k: m[k] for k in ("id", "sha256", "backbone", "weight")},
                     "input_size": m["preprocessing"]["input_size"], "calibration": m.get("calibration")}
                    for m in members],
        "rule": manifest["rule"], "weights": {"sha256": None},
        "selection": manifest.get("selection") or {}, "created": manifest.get("created"),
    }


def member_problem(ensemble: Ensemble, root: Path | None = None) -> str | None:
    """Why the ensemble would not load now (a member deleted or replaced), without hashing any weights."""
    try:
        member_checkpoints(ensemble, root)
    except (NotFoundError, CorruptError) as exc:
        return str(exc)
    return None


def describe_ensemble(ensemble: Ensemble, root: Path | None = None) -> dict[str, Any]:
    """One ensemble as ``ensemble list`` and ``ensemble show`` present it (JSON-ready)."""
    manifest = ensemble.manifest
    total = sum(m["weight"] for m in manifest["members"])
    selection = manifest.get("selection") or {}
    return {"name": ensemble.name, "id": ensemble.id, "path": str(ensemble.path), "created": manifest.get("created"),
            "classes": manifest["classes"], "dataset": (manifest.get("dataset") or {}).get("name"),
            "rule": manifest["rule"],
            "members": [{"id": m["id"], "backbone": m["backbone"], "weight": round(m["weight"] / total, 6),
                         "sha256": m["sha256"], "input_size": m["preprocessing"]["input_size"],
                         "calibration": (m.get("calibration") or {}).get("method"),
                         "monitor": m.get("monitor")} for m in manifest["members"]],
            "selection": selection, "val_metrics": selection.get("val_metrics"),
            "operating_point": manifest.get("operating_point"), "problem": member_problem(ensemble, root)}


def list_ensembles(root: Path | None = None) -> dict[str, Any]:
    """Every ensemble (with whether it loads now) and every damaged manifest."""
    found, damaged = scan_ensembles(root)
    return {"ensembles": [describe_ensemble(e, root) for e in found],
            "damaged": [{"path": str(d.path), "problem": d.problem} for d in damaged]}
