"""Exported models, out and back in: one ``.safetensors`` file that runs anywhere timm runs.

An exported file holds the weights and, in the safetensors header's ``__metadata__["dermcam"]``, one
JSON document (schema ``dermcam.export/1``) with everything inference needs: backbone, classes, label
encoding, preprocessing, validation metrics, the training config, versions and where it came from.
It loads without dermcam (see docs/checkpoints.md)::

    meta = json.loads(safe_open(path, "pt").metadata()["dermcam"])
    model = timm.create_model(meta["backbone"], num_classes=len(meta["classes"]))
    model.load_state_dict(safetensors.torch.load_file(path))

Exported files travel between machines, so :func:`read_exported` treats them as untrusted: the header
is parsed by hand with size limits before safetensors sees the file, every field is type-checked, the
tensor names and shapes must be exactly those of the backbone, and a digest of the tensors (stored in
the metadata) catches truncation and tampering. Nothing is ever unpickled. :func:`import_exported`
brings a validated file into the store as a new (not resumable) run.

An ensemble exports the same way (:func:`export_ensemble`, schema ``dermcam.ensemble-export/1``): its
members' tensors under ``members.<i>.`` prefixes in one file, each member checked like a single
model's tensors and against its own digest. What that document says, and the model it becomes, is in
:mod:`dermcam.store.ensemble_exchange`; reading, checking and writing files stays here, shared.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, CorruptError, DermcamError, NotFoundError, first_line
from dermcam.store import schema as s
from dermcam.store.checkpoint import Checkpoint, save_checkpoint, versions
from dermcam.store.ensemble_exchange import (
    ENSEMBLE_EXPORT_META,
    ENSEMBLE_EXPORT_SCHEMA,
    ensemble_document,
    ensemble_info,
    ensemble_model,
    is_ensemble_document,
    member_prefix,
    split_members,
)
from dermcam.store.ensembles import Ensemble, ensemble_name, member_checkpoints, read_ensemble
from dermcam.store.files import atomic_write_json, read_json, sha256_file, utc_now
from dermcam.store.locks import store_lock
from dermcam.store.references import resolve
from dermcam.store.runs import create_run, list_checkpoints, new_run_id, update_run
from dermcam.store.tensors import save_tensors

if TYPE_CHECKING:
    import torch

    from dermcam.models.ensemble import EnsembleModel

EXPORT_SCHEMA = "dermcam.export/1"


METADATA_KEY = "dermcam"


EXPORTS_FILE = "exports.json"


# A real header is a few hundred bytes per tensor; these limits stop a hostile file from making us
# read or parse gigabytes of JSON before anything else is checked.
MAX_HEADER_BYTES = 8 << 20


MAX_METADATA_BYTES = 1 << 20


DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


_FLOAT_CODES = set(DTYPES.values())


# The document in an exported file's header; shared parts (preprocessing, classes, ...) are a sidecar's.
EXPORT_META = s.all_of(s.obj({
    "backbone": s.BACKBONE,
    "classes": s.CLASSES,
    "preprocessing": s.PREPROCESSING,
    "dtype": s.one_of(*DTYPES),
    "tensors_sha256": s.SHA256,
}, optional={
    "label_encoding": s.LABEL_ENCODING,
    "metrics": s.obj(),
    "monitor": s.MONITOR,
    "dataset": s.DATASET,
    "config": s.CONFIG,
    "versions": s.obj(),
    "source": s.obj(optional={"id": s.ID, "epoch": s.EPOCH, "sha256": s.SHA256}),
    "exported": s.TIMESTAMP,
    "calibration": s.CALIBRATION,
    "operating_point": s.OPERATING_POINT,
}), s.fits_classes)


@dataclass(frozen=True)
class ExportedFile:
    """A validated exported file: its metadata, its tensors (as stored) and the file's sha256."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sha256: str

    def info(self) -> dict[str, Any]:
        """A sidecar-like dict for inference commands (same keys as a store checkpoint's sidecar, or for
        an ensemble as :func:`dermcam.store.ensembles.scoring_document`)."""
        if is_ensemble_document(self.meta):
            return ensemble_info(self.meta, self.path, self.sha256)
        source = self.meta.get("source") or {}
        return {
            **self.meta,
            "id": self.path.name,
            "source_id": source.get("id"),
            "sha256": self.sha256,
            "path": str(self.path),
            "weights": {"file": str(self.path), "sha256": self.sha256, "size": self.path.stat().st_size},
        }


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the tensors, independent of file layout."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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


def export_source(ref: str | Path | None, root: Path | None = None) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The checkpoint to export and its weights, checked against their sidecar hash first: a damaged
    checkpoint is never exported (in any format)."""
    with store_lock("store", shared=True, root=root):
        ckpt = resolve(ref, root)
        return ckpt, ckpt.load_weights(verify=True)


def export_target(output: Path | None, default_name: str, force: bool) -> Path:
    """Where an export goes: ``output`` (a file, or a folder for ``default_name``), else ./default_name;
    an existing file is replaced only with ``force``."""
    out = Path(output) if output is not None else Path.cwd() / default_name
    if out.is_dir():
        out = out / default_name
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
    ckpt, state = export_source(ref, root)
    out = export_target(output, default_export_name(ckpt, dtype), force)
    tensors = cast_tensors(state, dtype)
    meta = export_metadata(ckpt, tensors, dtype)
    text = metadata_text(f"checkpoint {ckpt.id}", meta)
    file_sha = save_tensors(out, tensors, metadata={"format": "pt", METADATA_KEY: text})
    out.chmod(0o644)  # the temporary file was private (0600); an export is meant to be shared
    return finish_export(ckpt, out, meta, "safetensors", file_sha=file_sha, root=root)


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


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor entries, dermcam metadata) from a safetensors header, checked before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BadInputError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise BadInputError(f"{path} is not a dermcam export: its header claims {header_len} bytes, over "
                                f"the {MAX_HEADER_BYTES}-byte limit")
        if header_len + 8 > size:
            raise BadInputError(f"{path} is not a safetensors file, or it is truncated (header runs past "
                                "the end of the file)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInputError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    text = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise BadInputError(f"{path} is a safetensors file but not a dermcam export (no '{METADATA_KEY}' "
                            "metadata); only files written by 'dermcam ckpt export' can be imported")
    if text.startswith("dermcam.checkpoint/"):
        raise BadInputError(f"{path} is the weights file of a store checkpoint, not an export; export it "
                            "first with: dermcam ckpt export")
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise BadInputError(f"{path}: dermcam metadata is over the {MAX_METADATA_BYTES}-byte limit")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise CorruptError(f"{path}: its dermcam metadata is not valid JSON (damaged or modified)") from None
    meta = _check_meta(path, meta)
    _check_length(path, header, size - 8 - header_len)
    _check_layout(path, header, size - 8 - header_len)
    return header, meta


def _check_length(path: Path, header: Mapping[str, Any], data_bytes: int) -> None:
    """A file cut short (an interrupted copy or download) is reported as such, not as a parse error."""
    ends = [e["data_offsets"][1] for e in header.values()
            if isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
            and isinstance(e["data_offsets"][1], int)]
    if ends and max(ends) > data_bytes:
        raise CorruptError(f"{path} is truncated: {max(ends) - data_bytes} bytes of weights are missing "
                           "(an interrupted copy or download?)")


# What each schema's document must satisfy (an ONNX document is never read from a safetensors file).
_FILE_SCHEMAS = {EXPORT_SCHEMA: EXPORT_META, ENSEMBLE_EXPORT_SCHEMA: ENSEMBLE_EXPORT_META}


# Bytes per element of the dtypes a safetensors header may name (what the layout check needs).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_layout(path: Path, header: Mapping[str, Any], data_bytes: int) -> None:
    """Each tensor's bytes are exactly what its shape and dtype need, and the tensors lie back to back,
    filling the data: checked before any network is built, so that a small file cannot make us build
    networks it does not hold (an ensemble's header can name up to 100 members)."""
    spans = []
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and entry.get("dtype") in _DTYPE_BYTES):
            raise CorruptError(f"{path}: the header entry of tensor {name} is malformed (damaged or modified)")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
            raise CorruptError(f"{path}: tensor {name} does not hold the bytes its shape and dtype need "
                               "(damaged or modified)")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise CorruptError(f"{path}: its tensors overlap or leave gaps (damaged or modified)")
        position = end
    if position != data_bytes:
        raise CorruptError(f"{path}: {data_bytes - position} bytes after the last tensor (damaged or modified)")


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """Validate the metadata document against its schema's (:data:`EXPORT_META`, or for an ensemble
    :data:`~dermcam.store.ensemble_exchange.ENSEMBLE_EXPORT_META`); one line naming the first bad field.

    The same preprocessing, class and monitor checks as a store sidecar's: what a sidecar may not
    hold (a NaN mean, a negative epoch) cannot be imported either.
    """
    check = _FILE_SCHEMAS.get(meta.get("schema")) if isinstance(meta, dict) else None
    if check is None:
        found = meta.get("schema") if isinstance(meta, dict) else type(meta).__name__
        raise BadInputError(f"{path}: unsupported export schema {found!r} (this dermcam reads "
                            f"{' and '.join(_FILE_SCHEMAS)})")
    s.validate(meta, check, f"{path}: metadata")
    return meta


def _check_tensors(path: Path, header: Mapping[str, Any], expected: Mapping[str, torch.Tensor], backbone: str,
                   prefix: str = "") -> None:
    """The file's tensor names, shapes and dtypes must be exactly those of ``backbone``'s state dict.
    ``header``: the entries of one model, names without ``prefix`` (an ensemble member's; messages
    name the tensors as they are in the file)."""
    names, wanted = set(header), set(expected)
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        detail = (f"missing {[prefix + n for n in missing[:3]]}" if missing else "") + \
                 (" " if missing and extra else "") + (f"unexpected {[prefix + n for n in extra[:3]]}" if extra else "")
        raise CorruptError(f"{path}: tensors {prefix + '*' + ' ' if prefix else ''}do not match backbone "
                           f"{backbone} ({detail})")
    for name, ref in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("shape") != list(ref.shape):
            shape = entry.get("shape") if isinstance(entry, dict) else None
            raise CorruptError(f"{path}: tensor {prefix}{name} has shape {shape}, backbone {backbone} needs "
                               f"{list(ref.shape)}")
        code = entry.get("dtype")
        ok = code in _FLOAT_CODES if ref.is_floating_point() else code == _safetensors_code(ref)
        if not ok:
            raise CorruptError(f"{path}: tensor {prefix}{name} has dtype {code}, which backbone {backbone} "
                               "cannot use")


def _safetensors_code(tensor: torch.Tensor) -> str:
    import torch

    return {torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}.get(tensor.dtype, "?")


def _reference_model(path: Path, backbone: str, num_classes: int) -> torch.nn.Module:
    """The network the file claims to hold, built empty, to check the tensors against."""
    from dermcam.models.backbones import build_model

    try:
        return build_model(backbone, num_classes)
    except DermcamError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BadInputError(f"{path}: backbone '{backbone}' cannot be built here ({first_line(exc)}); "
                            "a newer timm may be needed") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptError(f"{path} is damaged: {first_line(exc)}") from None


def read_exported(path: Path, *, calibrated: bool = True) -> tuple[ExportedFile, torch.nn.Module]:
    """Validate an exported file completely and return it with the model it loads into (eval mode):
    the backbone, or for an exported ensemble an :class:`~dermcam.models.ensemble.EnsembleModel`
    (``calibrated``: whether its members apply their calibrations, as for ``ensemble:NAME``).

    Raises :class:`BadInputError` for a file that is not a dermcam export at all and
    :class:`CorruptError` for one that claims to be but is truncated, modified or inconsistent.
    """
    from dermcam.models.backbones import load_strict

    path = Path(path)
    header, meta = read_header(path)
    if is_ensemble_document(meta):
        return _read_ensemble(path, header, meta, calibrated)
    model = _reference_model(path, meta["backbone"], len(meta["classes"]))
    _check_tensors(path, header, model.state_dict(), meta["backbone"])
    tensors = _load_tensors(path)
    if tensor_digest(tensors) != meta["tensors_sha256"]:
        raise CorruptError(f"{path}: the weights do not match the digest in its metadata (damaged or modified)")
    model = load_strict(model, tensors, meta["backbone"], str(path))
    return ExportedFile(path, meta, tensors, sha256_file(path)), model


def _read_ensemble(path: Path, header: dict[str, Any], meta: dict[str, Any],
                   calibrated: bool) -> tuple[ExportedFile, EnsembleModel]:
    """The checks of :func:`read_exported`, member by member: every tensor under exactly one member's
    prefix, each member's names, shapes and dtypes those of its backbone built empty (before anything
    is loaded), each member's tensors matching its own digest."""
    from dermcam.models.backbones import load_strict

    groups, strays = split_members(header, meta)
    if strays:
        raise CorruptError(f"{path}: tensors {strays[:3]} belong to no member of the ensemble (damaged or modified)")
    members = meta["members"]
    models = []
    for member, entries in zip(members, groups):
        model = _reference_model(path, member["backbone"], member["num_classes"])
        _check_tensors(path, entries, model.state_dict(), member["backbone"], member["prefix"])
        models.append(model)
    tensors = _load_tensors(path)
    for i, (member, model, own) in enumerate(zip(members, models, split_members(tensors, meta)[0])):
        if tensor_digest(own) != member["tensors_sha256"]:
            raise CorruptError(f"{path}: the weights of member {i} ({member['prefix']}*) do not match the digest in "
                               "its metadata (damaged or modified)")
        load_strict(model, own, member["backbone"], f"{path} member {i}")
    exported = ExportedFile(path, meta, tensors, sha256_file(path))
    return exported, ensemble_model(meta, models, calibrated=calibrated)


def load_exported(path: Path, *, calibrated: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, sidecar-like dict) for an exported file; what inference commands call.
    Dispatches on the file's schema: an exported ensemble gives what ``ensemble:NAME`` gives (an
    :class:`~dermcam.models.ensemble.EnsembleModel` and a dict shaped as ``scoring_document``).
    ``calibrated`` matters only for an exported ensemble (whose members calibrate inside the model)."""
    exported, model = read_exported(path, calibrated=calibrated)
    return model, exported.info()


def is_exported_file(ref: str | Path) -> bool:
    """A file that is not part of the store (no sidecar beside it): ``restore`` imports it."""
    path = Path(str(ref))
    return path.is_file() and path.suffix != ".json" and not path.with_suffix(".json").is_file() \
        and not path.name.endswith(".state.safetensors")


def _already_in_store(file_sha: str, source_sha: str | None, root: Path | None) -> Checkpoint | None:
    for ckpt in list_checkpoints(root):
        imported = ckpt.sidecar.get("imported") or {}
        if imported.get("file_sha256") == file_sha or ckpt.sidecar["weights"]["sha256"] == source_sha:
            return ckpt
    return None


def import_exported(path: Path, *, root: Path | None = None) -> dict[str, Any]:
    """Copy an exported file into the store as a new run (status ``imported``, not resumable).

    The file is validated completely (:func:`read_exported`) before anything is
    written, so a bad file leaves the store byte for byte as it was. The weights are stored as
    float32 like trained checkpoints, whatever precision the file used.
    """
    header_meta = read_header(path)[1]
    if is_ensemble_document(header_meta):
        raise BadInputError(f"{path} is an exported ensemble; 'ckpt restore' imports single checkpoints only. "
                            f"Use the file as it is: dermcam evaluate {path} / dermcam explain IMAGE -c {path}")
    exported, _ = read_exported(path)
    meta = exported.meta
    source = meta.get("source") or {}
    with store_lock("store", root=root):
        existing = _already_in_store(exported.sha256, source.get("sha256"), root)
        if existing is not None:
            return {"action": "import", "created": False, "id": existing.id, "run_id": existing.run_id,
                    "file": str(path), "source_id": source.get("id")}
        imported = {"file": path.name, "file_sha256": exported.sha256, "source_id": source.get("id"),
                    "source_sha256": source.get("sha256"), "dtype": meta["dtype"], "exported": meta.get("exported"),
                    "source_versions": meta.get("versions") or {}, "imported": utc_now()}
        run_dir = create_run(meta.get("config") or {}, root, new_run_id())
        try:
            update_run(run_dir, status="imported", imported=imported)
            ckpt = save_checkpoint(run_dir, epoch=source.get("epoch", 0),
                                   model_state=_as_float32(exported.tensors), sidecar=_imported_sidecar(meta, imported))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    return {"action": "import", "created": True, "id": ckpt.id, "run_id": ckpt.run_id, "file": str(path),
            "source_id": source.get("id"), "backbone": meta["backbone"], "classes": meta["classes"],
            "weights": str(ckpt.weights_path)}


def _as_float32(tensors: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}


def _imported_sidecar(meta: dict[str, Any], imported: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of an imported checkpoint; optional objects the file lacks are empty, never null."""
    keys = ("backbone", "classes", "label_encoding", "preprocessing", "pretrained")
    objects = ("metrics", "monitor", "config", "dataset")
    calibrated = {k: meta[k] for k in ("calibration", "operating_point") if meta.get(k) is not None}
    return {**{k: meta.get(k) for k in keys}, **{k: meta.get(k) or {} for k in objects}, **calibrated,
            "imported": imported}
