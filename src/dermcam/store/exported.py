"""An exported file, read as untrusted input: checked completely before any model is built or loaded.

An exported file (``dermcam ckpt export``, :mod:`dermcam.store.exchange`) holds the weights and, in
the safetensors header's ``__metadata__["dermcam"]``, one JSON document (schema ``dermcam.export/1``, or
``dermcam.ensemble-export/1`` for an ensemble, see :mod:`dermcam.store.ensemble_exchange`). Files travel
between machines, so :func:`read_exported` parses the header by hand with size limits before safetensors
sees the file, type-checks every field, requires the tensor names, shapes and dtypes to be exactly
those of the backbone built empty, and checks a digest of the tensors (stored in the metadata) that
catches truncation and tampering. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, CorruptError, DermcamError, NotFoundError, first_line
from dermcam.filekind import check_kind
from dermcam.store import schema as s
from dermcam.store.ensemble_exchange import (
    ENSEMBLE_EXPORT_META,
    ENSEMBLE_EXPORT_SCHEMA,
    ensemble_info,
    ensemble_model,
    is_ensemble_document,
    split_members,
)
from dermcam.store.files import sha256_file
from dermcam.store.tensors import check_tensors as _check_tensors

if TYPE_CHECKING:
    import torch

    from dermcam.models.ensemble import EnsembleModel


EXPORT_SCHEMA = "dermcam.export/1"


METADATA_KEY = "dermcam"


# A real header is a few hundred bytes per tensor; these limits stop a hostile file from making us
# read or parse gigabytes of JSON before anything else is checked.
MAX_HEADER_BYTES = 8 << 20


MAX_METADATA_BYTES = 1 << 20


DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


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
    "metadata": s.METADATA,
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


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor entries, dermcam metadata) from a safetensors header, checked before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}")
    # a file that is plainly something else (an ONNX model, a pickle, a web page) is named as such,
    # not reported as a header-size figure
    check_kind(path, ("safetensors", "empty"),
               "a dermcam export; dermcam reads .safetensors exports (written by 'dermcam ckpt export')")
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


def _reference_model(path: Path, backbone: str, num_classes: int,
                     metadata: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The network the file claims to hold, built empty, to check the tensors against (with
    ``metadata``, a validated metadata spec: the fusion model it describes)."""
    from dermcam.models.backbones import build_model

    try:
        return build_model(backbone, num_classes, metadata)
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
    model = _reference_model(path, meta["backbone"], len(meta["classes"]), meta.get("metadata"))
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
        model = _reference_model(path, member["backbone"], member["num_classes"], member.get("metadata"))
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
