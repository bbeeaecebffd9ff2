"""Tensors on disk without pickle: safetensors files, and nested training state split into JSON + tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import CorruptError, NotFoundError, first_line
from dermcam.store.files import atomic_path, sha256_file

if TYPE_CHECKING:
    import torch


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as safetensors; returns the file's sha256."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), optionally checking its sha256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise NotFoundError(f"missing weights file {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CorruptError(f"{path} does not match the sha256 in its sidecar (damaged or modified)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptError(f"{path} is not a readable safetensors file ({exc})") from None


def tensor_header(path: Path) -> dict[str, dict[str, Any]]:
    """Name -> ``{"shape": [...], "dtype": "F32"}`` of every tensor in a safetensors file, from its header
    alone (no tensor is read, torch is not imported); CorruptError when the file is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {name: {"shape": list(handle.get_slice(name).get_shape()),
                           "dtype": handle.get_slice(name).get_dtype()} for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def check_tensors(path: Path, header: Mapping[str, Any], expected: Mapping[str, torch.Tensor], backbone: str,
                  prefix: str = "") -> None:
    """The file's tensor names, shapes and dtypes (``header``, as :func:`tensor_header` gives them) must be
    exactly those of ``backbone``'s state dict ``expected`` (built empty: only shapes and dtypes count).
    ``prefix``: for an ensemble member's tensors in one file, whose names in ``header`` lack it (messages
    name the tensors as they are in the file). A store checkpoint and an exported file are checked alike."""
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
        ok = code in FLOAT_CODES if ref.is_floating_point() else code == _safetensors_code(ref)
        if not ok:
            raise CorruptError(f"{path}: tensor {prefix}{name} has dtype {code}, which backbone {backbone} "
                               "cannot use")


# safetensors' codes of the float dtypes a model's floating-point tensors may be stored in.
FLOAT_CODES = frozenset({"F32", "F16", "BF16"})


def _safetensors_code(tensor: torch.Tensor) -> str:
    import torch

    return {torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}.get(tensor.dtype, "?")


def split_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tensors, numpy arrays, scalars) into JSON and tensors.

    Tensors are replaced by ``{"__tensor__": key}``, numpy arrays by ``{"__ndarray__": key}``; tuples become
    lists (callers that need tuples rebuild them). This is how resume state is stored without pickle.
    """
    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu()
            return {"__tensor__": path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": path}
        if isinstance(value, Mapping):
            return {"__map__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} without pickle")

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`; a malformed skeleton or a missing tensor is a CorruptError."""
    def tensor(key: Any, as_array: bool) -> Any:
        value = tensors[key]
        return value.numpy() if as_array else value

    return _walk_skeleton(skeleton, tensor)


# What :func:`state_outline` puts where a tensor would be.
TENSOR = "<tensor>"


def state_outline(skeleton: Any) -> Any:
    """The state's JSON part as plain Python (dicts rebuilt), tensors replaced by :data:`TENSOR`.

    What the sidecar validator checks (epoch, best, ...) without reading the state file.
    """
    return _walk_skeleton(skeleton, lambda key, as_array: TENSOR)


def _walk_skeleton(skeleton: Any, tensor: Callable[[Any, bool], Any]) -> Any:
    """Rebuild a skeleton, ``tensor(key, as_array)`` standing in for each tensor reference. The skeleton
    comes from a sidecar on disk, so any shape it may have been damaged into ends as one CorruptError."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensor(node["__tensor__"], False)
            if "__ndarray__" in node:
                return tensor(node["__ndarray__"], True)
            if "__map__" in node:
                return {walk(k): walk(v) for k, v in node["__map__"]}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    try:
        return walk(skeleton)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        raise CorruptError("the training state is malformed or names a tensor its file lacks "
                           "(damaged or modified)") from None
