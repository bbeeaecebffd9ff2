"""Exported models, out and back in: one ``.safetensors`` file that runs anywhere timm runs.

:func:`export_checkpoint` writes a checkpoint's weights with, in the safetensors header's
``__metadata__["dermcam"]``, one JSON document (schema ``dermcam.export/1``) holding everything inference
needs: backbone, classes, label encoding, preprocessing, calibration, validation metrics, the training
config, versions and where it came from. It loads without dermcam (see docs/checkpoints.md)::

    meta = json.loads(safe_open(path, "pt").metadata()["dermcam"])
    model = timm.create_model(meta["backbone"], num_classes=len(meta["classes"]))
    model.load_state_dict(safetensors.torch.load_file(path))

An ensemble exports the same way (:func:`export_ensemble`, schema ``dermcam.ensemble-export/1``): its
members' tensors under ``members.<i>.`` prefixes in one file (the document's format is
:mod:`dermcam.store.ensemble_exchange`). Every export is recorded in its run's ``exports.json``, so
``ckpt list`` flags exported checkpoints.

:func:`import_exported` brings a file back into a store (``ckpt restore FILE``) after
:mod:`dermcam.store.exported` has validated it completely: a checkpoint becomes a new run marked
``imported`` (not resumable), an ensemble becomes one such run per member plus its manifest.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.checks import check_output_file
from dermcam.errors import BadInputError, DermcamError, NotFoundError
from dermcam.store import schema as s
from dermcam.store.checkpoint import Checkpoint, save_checkpoint, versions
from dermcam.store.ensemble_exchange import ensemble_document, is_ensemble_document, member_prefix, split_members
from dermcam.store.ensembles import (
    MANIFEST,
    Ensemble,
    check_name,
    ensemble_name,
    member_checkpoints,
    new_manifest,
    read_ensemble,
    write_manifest,
)
from dermcam.store.exported import (
    DTYPES,
    EXPORT_SCHEMA,
    MAX_METADATA_BYTES,
    METADATA_KEY,
    ExportedFile,
    read_exported,
    tensor_digest,
)
from dermcam.store.files import atomic_write_json, read_json, sha256_file, utc_now
from dermcam.store.locks import store_lock
from dermcam.store.references import find_checkpoint, resolve
from dermcam.store.runs import create_run, list_checkpoints, new_run_id, update_run
from dermcam.store.tensors import save_tensors

if TYPE_CHECKING:
    import torch

EXPORTS_FILE = "exports.json"


def cast_tensors(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors to ``dtype``; integer buffers (BatchNorm counters) stay as they are."""
    import torch

    target = getattr(torch, dtype)
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def model_document(ckpt: Checkpoint) -> dict[str, Any]:
    """What every export format carries about the model: classes, preprocessing, calibration, provenance."""
    side = ckpt.sidecar
    return {
        "backbone": side["backbone"],
        "classes": list(side["classes"]),
        "num_classes": len(side["classes"]),
        "label_encoding": side.get("label_encoding"),
        "preprocessing": side["preprocessing"],
        "metrics": side.get("metrics") or {},
        "monitor": side.get("monitor") or {},
        "dataset": side.get("dataset") or {},
        "config": side.get("config") or {},
        "pretrained": side.get("pretrained"),
        # How outputs become calibrated probabilities and decisions (present only once calibrated).
        **{k: side[k] for k in ("calibration", "operating_point") if side.get(k) is not None},
        # The patient metadata a fusion model reads (dermcam.metadata_spec): rebuilds its network.
        **({"metadata": side["metadata"]} if side.get("metadata") is not None else {}),
        "source": {"id": ckpt.id, "run_id": ckpt.run_id, "epoch": ckpt.epoch,
                   "sha256": side["weights"]["sha256"], "created": side.get("created"),
                   "versions": side.get("versions") or {}},
        "versions": versions(),
        "exported": utc_now(),
    }


def export_metadata(ckpt: Checkpoint, tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, Any]:
    """The ``dermcam.export/1`` document for ``ckpt`` (what a machine without the store needs)."""
    return {"schema": EXPORT_SCHEMA, **model_document(ckpt), "dtype": dtype, "tensors_sha256": tensor_digest(tensors)}


_PRECISION_SUFFIX = {"float32": "", "float16": "-fp16", "bfloat16": "-bf16"}


def default_export_name(ckpt: Checkpoint, dtype: str, suffix: str = ".safetensors") -> str:
    backbone = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(ckpt.sidecar["backbone"]))
    return f"dermcam-{backbone}-{ckpt.run_id}-e{ckpt.epoch}{_PRECISION_SUFFIX[dtype]}{suffix}"


def default_ensemble_name(ensemble: Ensemble, dtype: str, suffix: str = ".safetensors") -> str:
    """``dermcam-ensemble-<name>[-fp16|-bf16].<suffix>`` (an ensemble's name is already a plain name)."""
    return f"dermcam-ensemble-{ensemble.name}{_PRECISION_SUFFIX[dtype]}{suffix}"


def export_source(ref: str | Path | None, root: Path | None = None,
                  notes: list[str] | None = None) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The checkpoint to export and its weights, checked against their sidecar hash first: a damaged
    checkpoint is never exported (in any format). ``notes`` gets one line per damaged checkpoint that
    ``best``/``latest``/a run id passed over (the result's ``warnings``)."""
    with store_lock("store", shared=True, root=root):
        found = find_checkpoint(ref, root)
        if notes is not None:
            notes.extend(found.warnings)
        return found.checkpoint, found.checkpoint.load_weights(verify=True)


def export_target(output: Path | None, default_name: str, force: bool) -> Path:
    """Where an export goes: ``output`` (a file, or a folder for ``default_name``), else ./default_name;
    an existing file is replaced only with ``force``."""
    out = Path(output) if output is not None else Path.cwd() / default_name
    if out.is_dir():
        out = out / default_name
    check_output_file(out, "--output")  # a folder, or a path under a file: refused before anything is written
    if out.exists() and not force:
        raise BadInputError(f"{out} already exists; choose another -o or pass --force to replace it")
    return out


def metadata_text(what: str, meta: Mapping[str, Any]) -> str:
    """An export's document as JSON, refused when it is over what an import reads. ``what`` names the
    source in the message (``checkpoint 3fa9c1:7``, ``ensemble duo``)."""
    text = json.dumps(meta, default=str)
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise BadInputError(f"{what}: its metadata is over {MAX_METADATA_BYTES} bytes; "
                            "the training config is too large to export")
    return text


def finish_export(ckpt: Checkpoint, out: Path, meta: Mapping[str, Any], fmt: str, *, file_sha: str | None = None,
                  root: Path | None = None) -> dict[str, Any]:
    """Record a written export in its run's ``exports.json`` (``ckpt list`` flags it) and describe it."""
    record = {"id": ckpt.id, "sha256": ckpt.sidecar["weights"]["sha256"], "file": str(out.resolve()),
              "file_sha256": file_sha or sha256_file(out), "format": fmt, "dtype": meta["dtype"],
              "created": utc_now()}
    with store_lock("store", root=root):
        record_exports(ckpt.run_dir, [record])
    return {**record, "size": out.stat().st_size, "source_size": ckpt.weights_path.stat().st_size,
            "backbone": meta["backbone"], "classes": meta["classes"]}


def export_checkpoint(ref: str | Path | None, output: Path | None = None, *, dtype: str = "float32",
                      force: bool = False, root: Path | None = None) -> dict[str, Any]:
    """Write checkpoint ``ref`` as one self-contained safetensors file and record it in the run.

    The source weights are hash-checked first (:func:`export_source`), the file is written
    atomically, and the run's ``exports.json`` remembers the export so ``ckpt list`` can flag it.
    (``dermcam.deploy.onnx_export.export_onnx`` writes an ONNX file the same way.)
    An ensemble (``ensemble:NAME``, or a bare name with a manifest) goes to :func:`export_ensemble`.
    """
    if dtype not in DTYPES:
        raise BadInputError(f"unknown export dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    name = ensemble_name(ref, root)
    if name is not None:
        return export_ensemble(name, output, dtype=dtype, force=force, root=root)
    notes: list[str] = []
    ckpt, state = export_source(ref, root, notes)
    out = export_target(output, default_export_name(ckpt, dtype), force)
    tensors = cast_tensors(state, dtype)
    meta = export_metadata(ckpt, tensors, dtype)
    text = metadata_text(f"checkpoint {ckpt.id}", meta)
    file_sha = save_tensors(out, tensors, metadata={"format": "pt", METADATA_KEY: text})
    out.chmod(0o644)  # the temporary file was private (0600); an export is meant to be shared
    return {**finish_export(ckpt, out, meta, "safetensors", file_sha=file_sha, root=root), "warnings": notes}


def ensemble_source(name: str,
                    root: Path | None = None) -> tuple[Ensemble, list[Checkpoint], list[dict[str, torch.Tensor]]]:
    """An ensemble to export, its member checkpoints (each still the one the manifest names) and their
    weights, hash-checked, all under one shared store lock (as :func:`export_source`)."""
    with store_lock("store", shared=True, root=root):
        ensemble = read_ensemble(name, root)
        ckpts = member_checkpoints(ensemble, root)
        return ensemble, ckpts, [c.load_weights(verify=True) for c in ckpts]


def export_ensemble(name: str, output: Path | None = None, *, dtype: str = "float32", force: bool = False,
                    root: Path | None = None) -> dict[str, Any]:
    """Write ensemble ``name`` as one safetensors file: member ``i``'s tensors under ``members.<i>.``,
    the ``dermcam.ensemble-export/1`` document in the header (see :mod:`dermcam.store.ensemble_exchange`).

    Like a checkpoint's export: members are hash-checked first, the file is written atomically and
    never replaces one without ``force``; the export is recorded in each member's run (see
    :func:`finish_ensemble_export`).
    """
    if dtype not in DTYPES:
        raise BadInputError(f"unknown export dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    ensemble, ckpts, states = ensemble_source(name, root)
    out = export_target(output, default_ensemble_name(ensemble, dtype), force)
    members = [cast_tensors(state, dtype) for state in states]
    meta = ensemble_document(ensemble, [model_document(c) for c in ckpts], dtype=dtype,
                             digests=[tensor_digest(m) for m in members])
    tensors = {member_prefix(i) + k: v for i, member in enumerate(members) for k, v in member.items()}
    text = metadata_text(f"ensemble {name}", meta)
    file_sha = save_tensors(out, tensors, metadata={"format": "pt", METADATA_KEY: text})
    out.chmod(0o644)  # as export_checkpoint: the temporary file was private
    return finish_ensemble_export(ensemble, ckpts, out, meta, "safetensors", file_sha=file_sha, root=root)


def finish_ensemble_export(ensemble: Ensemble, ckpts: list[Checkpoint], out: Path, meta: Mapping[str, Any], fmt: str,
                           *, file_sha: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Record a written ensemble export in every member's run and describe it.

    An ensemble has no run of its own, and the file does hold each member's weights: so each member
    gets an ``exports.json`` record (with ``ensemble``: NAME) and the ``exported`` flag of ``ckpt list``,
    exactly as if it had been exported alone.
    """
    file_sha = file_sha or sha256_file(out)
    created = utc_now()
    records = [{"id": c.id, "sha256": c.sidecar["weights"]["sha256"], "file": str(out.resolve()),
                "file_sha256": file_sha, "format": fmt, "dtype": meta["dtype"], "created": created,
                "ensemble": ensemble.name} for c in ckpts]
    by_run: dict[Path, list[dict[str, Any]]] = {}
    for ckpt, record in zip(ckpts, records):
        by_run.setdefault(ckpt.run_dir, []).append(record)
    with store_lock("store", root=root):
        for run_dir, run_records in by_run.items():
            record_exports(run_dir, run_records)
    return {"id": ensemble.id, "kind": "ensemble", "file": str(out.resolve()), "file_sha256": file_sha,
            "format": fmt, "dtype": meta["dtype"], "created": created, "size": out.stat().st_size,
            "source_size": sum(c.weights_path.stat().st_size for c in ckpts),
            "backbone": "ensemble(" + "+".join(m["backbone"] for m in meta["members"]) + ")",
            "classes": meta["classes"], "members": [{k: r[k] for k in ("id", "sha256")} for r in records]}


def record_exports(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Replace the run's records of the file ``records`` name (one per checkpoint written to it) with them."""
    path = run_dir / EXPORTS_FILE
    if not run_dir.is_dir():  # the checkpoint was pruned while we exported; the file is still valid
        return
    files = {r["file"] for r in records}
    entries = [e for e in read_exports(run_dir) if e.get("file") not in files] + list(records)
    atomic_write_json(path, {"schema": "dermcam.exports/1", "exports": entries})


def read_exports(run_dir: Path) -> list[dict[str, Any]]:
    """Export records of a run (an unreadable ``exports.json`` only loses the 'exported' flag)."""
    path = Path(run_dir) / EXPORTS_FILE
    if not path.is_file():
        return []
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return []
    entries = data.get("exports") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def exports_of(ckpt: Checkpoint, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Exports made from exactly this checkpoint (same id and same weights hash: a later checkpoint
    that reuses the epoch number after a rollback is not flagged). ``records``: the run's, if read."""
    sha = ckpt.sidecar["weights"]["sha256"]
    records = read_exports(ckpt.run_dir) if records is None else records
    return [e for e in records if e.get("id") == ckpt.id and e.get("sha256") == sha]


def _holds(ckpt: Checkpoint, tensors_sha: str, source_sha: str | None, file_sha: str | None = None) -> bool:
    """Whether ``ckpt`` has exactly these weights: imported before from a file holding the same tensors
    (``tensors_sha``; ``file_sha`` for records older than that field), or it is the source checkpoint
    itself (a file exported from this store)."""
    imported = ckpt.sidecar.get("imported") or {}
    return (imported.get("tensors_sha256", "") == tensors_sha
            or (file_sha is not None and "tensors_sha256" not in imported and imported.get("file_sha256") == file_sha)
            or ckpt.sidecar["weights"]["sha256"] == source_sha)


def _already_in_store(ckpts: list[Checkpoint], tensors_sha: str, source_sha: str | None,
                      file_sha: str | None = None) -> Checkpoint | None:
    """The first of the store's checkpoints ``ckpts`` that :func:`_holds` these weights."""
    return next((c for c in ckpts if _holds(c, tensors_sha, source_sha, file_sha)), None)


def import_exported(path: Path, *, name: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Bring an exported file into the store (``ckpt restore FILE``).

    A checkpoint becomes a new run (status ``imported``, not resumable); an ensemble becomes one such run
    per member and a manifest named ``name`` (default: the name it was exported with). The file is
    validated completely (:func:`~dermcam.store.exported.read_exported`) before anything is written, so a
    bad file leaves the store byte for byte as it was. Weights are stored as float32 like trained
    checkpoints, whatever precision the file used. Importing the same file again changes nothing.
    """
    exported, _ = read_exported(path)
    if is_ensemble_document(exported.meta):
        return _import_ensemble(exported, name, root)
    if name is not None:
        raise BadInputError(f"--name names an imported ensemble; {path} holds one checkpoint")
    meta = exported.meta
    source = meta.get("source") or {}
    with store_lock("store", root=root):
        existing = _already_in_store(list_checkpoints(root), meta["tensors_sha256"], source.get("sha256"),
                                     exported.sha256)
        if existing is not None:
            return {"action": "import", "created": False, "id": existing.id, "run_id": existing.run_id,
                    "file": str(path), "source_id": source.get("id")}
        ckpt = _import_model(meta, exported.tensors, _imported_record(exported, meta, source), root)
    return {"action": "import", "created": True, "id": ckpt.id, "run_id": ckpt.run_id, "file": str(path),
            "source_id": source.get("id"), "backbone": meta["backbone"], "classes": meta["classes"],
            "weights": str(ckpt.weights_path)}


def _imported_record(exported: ExportedFile, meta: Mapping[str, Any], source: Mapping[str, Any],
                     **extra: Any) -> dict[str, Any]:
    """The ``imported`` entry of a run and its checkpoint: which file, which tensors, from where."""
    file_meta = exported.meta
    return {"file": exported.path.name, "file_sha256": exported.sha256, "tensors_sha256": meta["tensors_sha256"],
            "source_id": source.get("id"), "source_sha256": source.get("sha256"), "dtype": file_meta["dtype"],
            "exported": file_meta.get("exported"), "source_versions": file_meta.get("versions") or {},
            "imported": utc_now(), **extra}


def _import_model(meta: Mapping[str, Any], tensors: dict[str, torch.Tensor], imported: dict[str, Any],
                  root: Path | None) -> Checkpoint:
    """One model as a new run with a single checkpoint (the caller holds the store lock)."""
    source = meta.get("source") or {}
    run_dir = create_run(meta.get("config") or {}, root, new_run_id())
    try:
        update_run(run_dir, status="imported", imported=imported)
        return save_checkpoint(run_dir, epoch=source.get("epoch", 0), model_state=_as_float32(tensors),
                               sidecar=_imported_sidecar(meta, imported))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _import_ensemble(exported: ExportedFile, name: str | None, root: Path | None) -> dict[str, Any]:
    """Each member as an imported checkpoint (or the store's own copy of it), then the manifest, all under
    one store lock; if anything fails, the runs this call created are removed again.

    The manifest takes every member's preprocessing and calibration from the file, not from the
    checkpoint it resolves to (a source checkpoint recalibrated since the export keeps answering its
    new way alone), so ``ensemble:NAME`` answers exactly as the file does.
    """
    meta = exported.meta
    name = check_name(name or meta["name"])
    members = meta["members"]
    states = split_members(exported.tensors, meta)[0]
    new_ckpts: list[Checkpoint] = []
    with store_lock("store", root=root):
        existing = _existing_ensemble(name, members, root)
        if existing is not None:
            return _ensemble_imported(exported, existing, [], created=False)
        try:
            ckpts, known = [], list_checkpoints(root)  # read once; what this loop imports is added
            for i, (member, tensors) in enumerate(zip(members, states)):
                source = member["source"]
                ckpt = _already_in_store(known, member["tensors_sha256"], source["sha256"])
                if ckpt is None:
                    record = _imported_record(exported, member, source, ensemble=meta["name"], member=i)
                    ckpt = _import_model({**member, "classes": meta["classes"]}, tensors, record, root)
                    new_ckpts.append(ckpt)
                    known.append(ckpt)
                ckpts.append(ckpt)
            ensemble = new_manifest(name, ckpts, [m["weight"] for m in members],
                                    operating_point=meta.get("operating_point"),
                                    selection={**(meta.get("selection") or {}), "imported": exported.path.name},
                                    root=root)
            for record, member in zip(ensemble.manifest["members"], members):
                record.update(preprocessing=member["preprocessing"], calibration=member.get("calibration"))
            s.validate(ensemble.manifest, MANIFEST, f"ensemble {name}")
            ensemble = write_manifest(ensemble, root=root)
        except BaseException:
            for ckpt in new_ckpts:
                shutil.rmtree(ckpt.run_dir, ignore_errors=True)
            raise
    return _ensemble_imported(exported, ensemble, new_ckpts, created=True)


def _existing_ensemble(name: str, members: list[dict[str, Any]], root: Path | None) -> Ensemble | None:
    """The store's ensemble ``name`` if it already is this file's (same members, weights and calibrations);
    None if there is none; a one-line error if the name is taken by another ensemble."""
    try:
        current = read_ensemble(name, root)
    except NotFoundError:
        return None
    have = current.manifest["members"]
    total = math.fsum(m["weight"] for m in have)
    same = len(have) == len(members) and all(
        m.get("calibration") == f.get("calibration") and abs(m["weight"] / total - f["weight"]) <= 1e-9
        and (m["sha256"] == f["source"]["sha256"] or _imported_from(m["id"], f, root))
        for m, f in zip(have, members))
    if not same:
        raise BadInputError(f"this store already has a different ensemble named '{name}'; import under "
                            "another name with --name NAME")
    return current


def _imported_from(ckpt_id: str, member: Mapping[str, Any], root: Path | None) -> bool:
    try:
        ckpt = resolve(ckpt_id, root)
    except DermcamError:
        return False
    return _holds(ckpt, member["tensors_sha256"], member["source"]["sha256"])


def _ensemble_imported(exported: ExportedFile, ensemble: Ensemble, imported: list[Checkpoint], *,
                       created: bool) -> dict[str, Any]:
    """What ``restore`` reports: ``created`` whether the manifest was written now, per member whether its
    checkpoint was imported now or was in the store already."""
    made = {c.id for c in imported}
    members = ensemble.manifest["members"]
    return {"action": "import", "kind": "ensemble", "created": created, "id": ensemble.id, "name": ensemble.name,
            "file": str(exported.path), "source_id": (exported.meta.get("source") or {}).get("id"),
            "backbone": "ensemble(" + "+".join(m["backbone"] for m in members) + ")",
            "classes": list(exported.meta["classes"]),
            "members": [{"id": m["id"], "backbone": m["backbone"], "created": m["id"] in made} for m in members]}


def _as_float32(tensors: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


def _imported_sidecar(meta: Mapping[str, Any], imported: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of an imported checkpoint; optional objects the file lacks are empty, never null."""
    keys = ("backbone", "classes", "label_encoding", "preprocessing", "pretrained")
    objects = ("metrics", "monitor", "config", "dataset")
    calibrated = {k: meta[k] for k in ("calibration", "operating_point", "metadata") if meta.get(k) is not None}
    return {**{k: meta.get(k) for k in keys}, **{k: meta.get(k) or {} for k in objects}, **calibrated,
            "imported": imported}
