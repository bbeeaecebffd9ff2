"""A checkpoint as one ONNX file: photo pixels in, logits and calibrated probabilities out.

The graph takes what a caller can produce with Pillow alone, the photo decoded and cropped to the
checkpoint's cache size (uint8, NHWC, RGB), and does the rest of dermcam's geometry itself: the
antialiased bilinear resize to the model's input size (as a pair of fixed matrices, so it equals
:func:`dermcam.data.geometry.resize` to float rounding), scaling to 0..1, normalising, the network,
the softmax and, when the checkpoint is calibrated, its temperature or vector scaling. Baking these
in is what keeps a deployment from silently feeding the model a differently resized or normalised
image: the one step left to the caller (the centre crop to the cache aspect) is a documented
Pillow call. A flip-TTA average is not part of the graph.

:func:`export_onnx` exports with the TorchScript-based ``torch.onnx.export`` (no onnxscript
needed), checks the model with ``onnx.checker``, runs it once in ONNX Runtime against PyTorch on the
same pixels (a file that disagrees is never written), writes it atomically and records it in the
run like a safetensors export (it shares ``dermcam.store.exchange``'s source check, metadata and
records). The optional packages (``dermcam[onnx]``) are imported inside the functions that use them,
so a missing one is a one-line error; torch is imported at the top, as only the export command
imports this module.

An ensemble (``ensemble:NAME``) exports the same way: its :class:`~dermcam.models.ensemble.EnsembleModel`
already resizes, normalises and calibrates for each member, so the graph only scales the pixels to
0..1 and calls it (``logits`` = log p, ``probabilities`` = p). Only the members' antialiased resize is
swapped for the same fixed matrices (:class:`MatrixResize`), since ONNX has no antialiased resize;
the check compares ONNX Runtime with the ensemble as ``evaluate`` runs it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dermcam import __version__
from dermcam.data.geometry import cache_size, resize, to_float
from dermcam.errors import BadInputError, DermcamError
from dermcam.models.ensemble import LOG_FLOOR, EnsembleModel, calibration_terms
from dermcam.store.checkpoint import Checkpoint
from dermcam.store.ensemble_exchange import ENSEMBLE_ONNX_SCHEMA, ensemble_document, ensemble_model
from dermcam.store.ensembles import ensemble_name
from dermcam.store.exchange import (
    default_ensemble_name,
    default_export_name,
    ensemble_source,
    export_source,
    export_target,
    finish_ensemble_export,
    finish_export,
    metadata_text,
    model_document,
)
from dermcam.store.exported import METADATA_KEY
from dermcam.store.files import atomic_write_bytes

ONNX_SCHEMA = "dermcam.onnx/1"
OPSET = 17  # ONNX Runtime >= 1.14 and every current converter read it
INPUT = "image"
OUTPUTS = ("logits", "probabilities")
INSTALL_HINT = "pip install 'dermcam[onnx]'"
# The largest difference in probability between ONNX Runtime and PyTorch that an export accepts.
TOLERANCE = 1e-4


def require_onnx() -> None:
    """A one-line error naming the extra when onnx or onnxruntime is missing (checked before any work)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BadInputError(f"ONNX export needs the onnx and onnxruntime packages ({exc.name or exc} is "
                            f"missing): {INSTALL_HINT}") from None


def onnx_metadata(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``dermcam.onnx/1`` document: what a safetensors export says about the model (without its
    tensor digest), the cache size always filled in (it is the graph's input size), and the graph."""
    doc = model_document(ckpt)
    preprocessing = {**doc["preprocessing"], "cache_size": list(cache_size(doc["preprocessing"]))}
    return {"schema": ONNX_SCHEMA, **doc, "preprocessing": preprocessing, "dtype": "float32",
            "graph": graph_description(preprocessing, calibrated="calibration" in doc)}


def graph_description(preprocessing: Mapping[str, Any], calibrated: bool, *, ensemble: bool = False) -> dict[str, Any]:
    """What the ``dermcam.onnx/1`` (or ensemble) document says about the graph's input and outputs."""
    width, height = cache_size(preprocessing)
    inside = "resizing to input_size and normalising happen inside the graph"
    if ensemble:
        inside = "resizing to each member's input_size and normalising happen inside the graph"
        outputs = {"logits": "log of the ensemble's probabilities (batch, classes): softmax(logits) is them",
                   "probabilities": "the ensemble's probabilities (batch, classes): the weighted mean of the "
                                    "members' calibrated probabilities (members, rule)"}
    elif calibrated:
        outputs = {"logits": "raw class scores (batch, classes), before any calibration",
                   "probabilities": "calibrated probabilities (batch, classes): the calibration below applied "
                                    "to softmax(logits)"}
    else:
        outputs = {"logits": "raw class scores (batch, classes), before any calibration",
                   "probabilities": "softmax(logits) (batch, classes); this checkpoint has no calibration"}
    return {
        "opset": OPSET,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", height, width, 3],
                  "color": "RGB", "content": "the photo scaled to cover cache_size and cropped at the centre "
                                             f"(dermcam.data.geometry.cover_resize); {inside}"},
        "outputs": outputs,
    }


def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix of geometry.resize along one axis, read off by resizing unit impulses.

    The antialiased bilinear resize is linear and separable, so ``rows @ x @ cols.T`` equals it; the
    impulses are float32 like the images, so the weights are exactly the ones PyTorch uses.
    """
    impulses = torch.eye(size_in, dtype=torch.float32).view(size_in, 1, 1, size_in)
    return resize(impulses, (1, size_out)).view(size_in, size_out).T.contiguous()


class MatrixResize(torch.nn.Module):
    """:func:`dermcam.data.geometry.resize` from one fixed (H, W) to another as ``rows @ x @ cols``
    (identity when the sizes agree): what ONNX can run, equal to the antialiased resize to float rounding."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        super().__init__()
        self.resizes = tuple(size_in) != tuple(size_out)
        if self.resizes:
            self.register_buffer("rows", _resize_matrix(size_in[0], size_out[0]))
            self.register_buffer("cols", _resize_matrix(size_in[1], size_out[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols if self.resizes else x


class MatrixResizedEnsemble(torch.nn.Module):
    """``ensemble`` on the cache image in [0, 1], each member's resize done by a :class:`MatrixResize`
    (then :meth:`EnsembleModel.combine`: the members' own normalisation, network and calibration)."""

    def __init__(self, ensemble: EnsembleModel, cache: tuple[int, int]) -> None:
        super().__init__()
        self.ensemble = ensemble
        width, height = cache
        self.resizes = torch.nn.ModuleList(MatrixResize((height, width), member.size) for member in ensemble.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [member.normalise(resize_to(x)) for member, resize_to in zip(self.ensemble.members, self.resizes)]
        return self.ensemble.combine(inputs)


class InferenceGraph(torch.nn.Module):
    """``model`` taking cache-sized uint8 NHWC pixels and returning (logits, probabilities): what the
    ONNX file holds, and what the export is checked against."""

    def __init__(self, model: torch.nn.Module, preprocessing: Mapping[str, Any],
                 calibration: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.model = model
        cache_w, cache_h = cache_size(preprocessing)
        _, height, width = (int(v) for v in preprocessing["input_size"])
        self.resize = MatrixResize((cache_h, cache_w), (height, width))
        self.register_buffer("mean", torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.calibrated = bool(calibration)
        scale, bias = calibration_terms(calibration)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.eval()  # the exporter restores this mode to every submodule when it is done

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.resize(image.permute(0, 3, 1, 2).float() / 255.0)
        logits = self.model((x - self.mean) / self.std)
        probabilities = logits.softmax(1)
        if self.calibrated:  # evaluate.calibration.rescale, in float32
            probabilities = (probabilities.clamp_min(LOG_FLOOR).log() * self.scale + self.bias).softmax(1)
        return logits, probabilities


def example_pixels(preprocessing: Mapping[str, Any], batch: int) -> torch.Tensor:
    """A fixed batch of smooth, photo-like uint8 pixels at the cache size (to trace and to check)."""
    width, height = cache_size(preprocessing)
    y = torch.linspace(0, 1, height).view(1, height, 1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width, 1)
    phase = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    channel = torch.tensor([0.0, 2.0, 4.0]).view(1, 1, 1, 3)
    wave = torch.sin(6 * x + 4 * y + phase + channel) * torch.cos(5 * y - 3 * x + phase)
    return ((wave * 0.5 + 0.5) * 255).round().to(torch.uint8)


def onnx_bytes(graph: InferenceGraph, preprocessing: Mapping[str, Any], metadata: str) -> bytes:
    """The checked ONNX model of ``graph`` with ``metadata`` (JSON) as ``metadata_props["dermcam"]``."""
    import onnx

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(graph, (example_pixels(preprocessing, 2),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "dermcam", __version__
    proto.doc_string = (f"dermcam classifier: {INPUT} uint8 (batch, H, W, 3) RGB at the cache size -> "
                        f"{', '.join(OUTPUTS)}; see metadata_props['{METADATA_KEY}']")
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def check_against_pytorch(data: bytes, graph: InferenceGraph, preprocessing: Mapping[str, Any],
                          reference: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Largest |probability difference| between ONNX Runtime and PyTorch on a batch of 3; raises above
    :data:`TOLERANCE`, so a graph the exporter got wrong is never written. ``reference``: PyTorch's
    probabilities for the uint8 pixels (default: the graph's own)."""
    import onnxruntime

    pixels = example_pixels(preprocessing, 3)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    _, onnx_probs = session.run(None, {INPUT: pixels.numpy()})
    with torch.no_grad():
        torch_probs = (reference or (lambda px: graph(px)[1]))(pixels).numpy()
    gap = float(abs(onnx_probs - torch_probs).max())
    if not gap <= TOLERANCE:
        raise DermcamError(f"the ONNX graph's probabilities differ from PyTorch's by {gap:.2g} (over "
                           f"{TOLERANCE}); nothing was written")
    return gap


def export_onnx(ref: str | Path | None, output: Path | None = None, *, force: bool = False,
                root: Path | None = None) -> dict[str, Any]:
    """Write checkpoint ``ref`` as one ONNX file and record it in its run (``ckpt list``: exported).

    The result is :func:`dermcam.store.exchange.finish_export`'s plus ``check_gap``, the largest
    probability difference between ONNX Runtime and PyTorch measured before writing. An ensemble
    (``ensemble:NAME``) goes to :func:`export_ensemble_onnx`.
    """
    from dermcam.models.backbones import build_with_weights

    require_onnx()
    name = ensemble_name(ref, root)
    if name is not None:
        return export_ensemble_onnx(name, output, force=force, root=root)
    notes: list[str] = []  # damaged checkpoints 'best' passed over
    ckpt, state = export_source(ref, root, notes)
    out = export_target(output, default_export_name(ckpt, "float32", ".onnx"), force)
    meta = onnx_metadata(ckpt)
    model = build_with_weights(meta["backbone"], len(meta["classes"]), state, f"checkpoint {ckpt.id}")
    preprocessing = meta["preprocessing"]
    graph = InferenceGraph(model, preprocessing, meta.get("calibration"))
    data = onnx_bytes(graph, preprocessing, metadata_text(f"checkpoint {ckpt.id}", meta))
    gap = check_against_pytorch(data, graph, preprocessing)
    atomic_write_bytes(out, data)
    return {**finish_export(ckpt, out, meta, "onnx", root=root), "check_gap": gap, "warnings": notes}


def export_ensemble_onnx(name: str, output: Path | None = None, *, force: bool = False,
                         root: Path | None = None) -> dict[str, Any]:
    """Write ensemble ``name`` as one ONNX file: uint8 pixels at the members' cache size in, ``logits``
    (log p) and ``probabilities`` (p, the ensemble's) out; recorded in each member's run.

    The document (schema ``dermcam.ensemble-onnx/1``) is the safetensors export's without tensor
    digests, plus ``graph``. Before writing, ONNX Runtime is checked against the ensemble exactly as
    ``evaluate ensemble:NAME`` runs it (antialiased resize, not the graph's matrices).
    """
    from dermcam.models.backbones import build_with_weights

    require_onnx()
    ensemble, ckpts, states = ensemble_source(name, root)
    out = export_target(output, default_ensemble_name(ensemble, "float32", ".onnx"), force)
    meta = ensemble_document(ensemble, [model_document(c) for c in ckpts], dtype="float32", digests=None,
                             schema=ENSEMBLE_ONNX_SCHEMA)
    preprocessing = meta["preprocessing"]  # the cache image as it is: the graph's input
    meta["graph"] = graph_description(preprocessing, True, ensemble=True)
    models = [build_with_weights(m["backbone"], m["num_classes"], state, f"checkpoint {c.id}")
              for m, state, c in zip(meta["members"], states, ckpts)]
    model = ensemble_model(meta, models)
    graph = InferenceGraph(MatrixResizedEnsemble(model, cache_size(preprocessing)), preprocessing, None)
    data = onnx_bytes(graph, preprocessing, metadata_text(f"ensemble {name}", meta))
    gap = check_against_pytorch(data, graph, preprocessing,
                                reference=lambda pixels: model(to_float(pixels.numpy())).softmax(1))
    atomic_write_bytes(out, data)
    return {**finish_ensemble_export(ensemble, ckpts, out, meta, "onnx", root=root), "check_gap": gap}
