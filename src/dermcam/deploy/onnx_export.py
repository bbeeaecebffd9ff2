"""A checkpoint as one ONNX file: photo pixels in, logits and calibrated probabilities out.

The graph takes what a caller can produce with Pillow alone, the photo decoded and cropped to the
checkpoint's cache size (uint8, NHWC, RGB), and does the rest of dermcam's geometry itself: the
colour constancy the checkpoint records (Shades of Gray, at the cache size; :mod:`dermcam.color`), the
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

A model trained with patient metadata (``train --metadata``) exports with a second input, ``metadata``:
float32 (batch, D), the rows :func:`dermcam.data.metadata.encode` makes (the document's ``metadata``
block is the encoding: its ``features`` name the D columns, and ``graph.inputs`` gives the all-unknown
row for an image without metadata). An ensemble whose members read metadata takes one such input too,
its members' rows side by side (``graph.inputs[1].members`` gives each member's columns). The check
against PyTorch runs with known and unknown rows.

An ensemble (``ensemble:NAME``) exports the same way: its :class:`~dermcam.models.ensemble.EnsembleModel`
already resizes, normalises and calibrates for each member, so the graph only scales the pixels to
0..1 and calls it (``logits`` = log p, ``probabilities`` = p). Only the members' antialiased resize is
swapped for the same fixed matrices (:class:`MatrixResize`), since ONNX has no antialiased resize;
the check compares ONNX Runtime with the ensemble as ``evaluate`` runs it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dermcam import __version__
from dermcam.color import color_constancy_of
from dermcam.data.geometry import cache_size, color_constancy, resize, to_float
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
METADATA_INPUT = "metadata"  # the second input of a metadata model's graph
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
            "graph": graph_description(preprocessing, calibrated="calibration" in doc,
                                       metadata=[("", doc.get("metadata"))])}


def graph_description(preprocessing: Mapping[str, Any], calibrated: bool, *, ensemble: bool = False,
                      metadata: Sequence[tuple[str, Mapping[str, Any] | None]] = ()) -> dict[str, Any]:
    """What the ``dermcam.onnx/1`` (or ensemble) document says about the graph's inputs and outputs.
    ``metadata``: (member id, its metadata block or None) per model that answers (a checkpoint: one, id
    ""); when any reads metadata the graph has the second input :data:`METADATA_INPUT`."""
    width, height = cache_size(preprocessing)
    inside = "resizing to input_size and normalising happen inside the graph"
    if color_constancy_of(preprocessing) != "none":
        inside = f"colour constancy ({color_constancy_of(preprocessing)}), at the cache size, then " + inside
    if ensemble:
        inside = ("each member's own colour constancy (its preprocessing.color_constancy), resizing to its "
                  "input_size and normalising happen inside the graph")
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
    image = {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", height, width, 3],
             "color": "RGB", "content": "the photo scaled to cover cache_size and cropped at the centre "
                                        f"(dermcam.data.geometry.cover_resize); {inside}"}
    described = {"opset": OPSET, "input": image, "outputs": outputs}
    meta_input = metadata_input(metadata)
    if meta_input is not None:
        described["inputs"] = [image, meta_input]
    return described


def metadata_specs(metadata: Sequence[tuple[str, Mapping[str, Any] | None]]) -> list[tuple[str, Any]]:
    """(member id, MetadataSpec or None) for each model that answers; [] entries' specs are None."""
    from dermcam.metadata_spec import MetadataSpec

    return [(name, None if block is None else MetadataSpec.from_dict(block)) for name, block in metadata]


def metadata_input(metadata: Sequence[tuple[str, Mapping[str, Any] | None]]) -> dict[str, Any] | None:
    """The document's description of the ``metadata`` input (None when no model reads metadata)."""
    specs = metadata_specs(metadata)
    if all(spec is None for _, spec in specs):
        return None
    described: dict[str, Any] = {
        "name": METADATA_INPUT, "dtype": "float32", "shape": ["batch", sum(s.dim for _, s in specs if s)],
        "content": "each image's patient metadata encoded as dermcam.data.metadata.encode does (the metadata "
                   "block: age scaled by its mean and std plus an unknown flag, one-hot sex and site, each with "
                   "an unknown column); an image without metadata: the unknown row"}
    if len(specs) == 1:
        spec = specs[0][1]
        described.update(features=spec.features, unknown=spec.unknown())
        return described
    members, offset = [], 0
    for name, spec in specs:
        if spec is not None:
            members.append({"id": name, "offset": offset, "dim": spec.dim, "features": spec.features,
                            "unknown": spec.unknown()})
            offset += spec.dim
    described.update(members=members, unknown=[v for m in members for v in m["unknown"]])
    described["content"] += "; the members that read metadata side by side, in member order (members)"
    return described


def example_metadata(metadata: Sequence[tuple[str, Mapping[str, Any] | None]], batch: int) -> torch.Tensor | None:
    """A fixed batch of encoded metadata rows (all unknown, then known ages, sexes and sites in turn) for
    the graph's second input; None when no model reads metadata."""
    import pandas as pd

    from dermcam.data.metadata import encode

    specs = [spec for _, spec in metadata_specs(metadata) if spec is not None]
    if not specs:
        return None
    values = [("", "", ""), ("30", "female", 0), ("75", "male", -1), ("52", "", 1)]
    parts = []
    for spec in specs:
        sites = list(spec.sites) or [""]
        rows = [values[i % len(values)] for i in range(batch)]
        frame = pd.DataFrame({"age": [r[0] for r in rows], "sex": [r[1] for r in rows],
                              "localization": [r[2] if isinstance(r[2], str) else sites[r[2] % len(sites)]
                                               for r in rows]})
        parts.append(torch.from_numpy(encode(spec, frame)))
    return torch.cat(parts, dim=1)


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

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """``metadata``: the members' encoded rows side by side (see :func:`metadata_input`)."""
        inputs = [member.normalise(resize_to(member.color_constancy(x)))
                  for member, resize_to in zip(self.ensemble.members, self.resizes)]
        return self.ensemble.combine(inputs, self.split(metadata))

    def split(self, metadata: torch.Tensor | None) -> list[torch.Tensor | None] | None:
        """The ``metadata`` input as one (batch, D_i) slice per member (None for a member that reads none)."""
        if metadata is None:
            return None
        parts: list[torch.Tensor | None] = []
        offset = 0
        for member in self.ensemble.members:
            dim = member.model.spec.dim if member.uses_metadata else 0
            parts.append(metadata[:, offset:offset + dim] if dim else None)
            offset += dim
        return parts


class InferenceGraph(torch.nn.Module):
    """``model`` taking cache-sized uint8 NHWC pixels and returning (logits, probabilities): what the
    ONNX file holds, and what the export is checked against."""

    def __init__(self, model: torch.nn.Module, preprocessing: Mapping[str, Any],
                 calibration: Mapping[str, Any] | None, metadata: bool = False) -> None:
        super().__init__()
        self.model = model
        self.metadata = metadata  # the model takes (x, meta): the graph's second input
        self.preprocessing = dict(preprocessing)  # its colour constancy, applied as geometry.batch_input does
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

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.resize(color_constancy(image.permute(0, 3, 1, 2).float() / 255.0, self.preprocessing))
        z = (x - self.mean) / self.std
        logits = self.model(z, metadata) if self.metadata else self.model(z)
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


def onnx_bytes(graph: InferenceGraph, preprocessing: Mapping[str, Any], metadata: str,
               rows: torch.Tensor | None = None) -> bytes:
    """The checked ONNX model of ``graph`` with ``metadata`` (JSON) as ``metadata_props["dermcam"]``;
    ``rows``: example encoded metadata (a metadata model's second input, traced with them)."""
    import onnx

    buffer = io.BytesIO()
    inputs = [INPUT] if rows is None else [INPUT, METADATA_INPUT]
    example = (example_pixels(preprocessing, 2),) if rows is None else (example_pixels(preprocessing, 2), rows[:2])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(graph, example, buffer, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=list(OUTPUTS),
                          dynamic_axes={name: {0: "batch"} for name in (*inputs, *OUTPUTS)})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "dermcam", __version__
    proto.doc_string = (f"dermcam classifier: {INPUT} uint8 (batch, H, W, 3) RGB at the cache size"
                        + (f" and {METADATA_INPUT} float32 (batch, D) encoded patient metadata" if rows is not None
                           else "") + f" -> {', '.join(OUTPUTS)}; see metadata_props['{METADATA_KEY}']")
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def check_against_pytorch(data: bytes, graph: InferenceGraph, preprocessing: Mapping[str, Any],
                          reference: Callable[..., torch.Tensor] | None = None,
                          rows: torch.Tensor | None = None) -> float:
    """Largest |probability difference| between ONNX Runtime and PyTorch on a batch of 3 (4 with
    metadata ``rows``: unknown and known rows); raises above :data:`TOLERANCE`, so a graph the exporter
    got wrong is never written. ``reference``: PyTorch's probabilities for the uint8 pixels (and the
    rows) (default: the graph's own)."""
    import onnxruntime

    pixels = example_pixels(preprocessing, 3 if rows is None else len(rows))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {INPUT: pixels.numpy()} if rows is None else {INPUT: pixels.numpy(), METADATA_INPUT: rows.numpy()}
    _, onnx_probs = session.run(None, feeds)
    extra = () if rows is None else (rows,)
    with torch.no_grad():
        torch_probs = (reference or (lambda px, *meta: graph(px, *meta)[1]))(pixels, *extra).numpy()
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
    model = build_with_weights(meta["backbone"], len(meta["classes"]), state, f"checkpoint {ckpt.id}",
                               meta.get("metadata"))
    preprocessing = meta["preprocessing"]
    rows = example_metadata([("", meta.get("metadata"))], 4)
    graph = InferenceGraph(model, preprocessing, meta.get("calibration"), metadata=rows is not None)
    data = onnx_bytes(graph, preprocessing, metadata_text(f"checkpoint {ckpt.id}", meta), rows)
    gap = check_against_pytorch(data, graph, preprocessing, rows=rows)
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
    member_metadata = [(m["source"]["id"], m.get("metadata")) for m in meta["members"]]
    meta["graph"] = graph_description(preprocessing, True, ensemble=True, metadata=member_metadata)
    models = [build_with_weights(m["backbone"], m["num_classes"], state, f"checkpoint {c.id}", m.get("metadata"))
              for m, state, c in zip(meta["members"], states, ckpts)]
    model = ensemble_model(meta, models)
    rows = example_metadata(member_metadata, 4)
    resized = MatrixResizedEnsemble(model, cache_size(preprocessing))
    graph = InferenceGraph(resized, preprocessing, None, metadata=rows is not None)
    data = onnx_bytes(graph, preprocessing, metadata_text(f"ensemble {name}", meta), rows)
    gap = check_against_pytorch(data, graph, preprocessing, rows=rows,
                                reference=lambda pixels, *meta_rows: model(
                                    to_float(pixels.numpy()), *(resized.split(r) for r in meta_rows)).softmax(1))
    atomic_write_bytes(out, data)
    return {**finish_ensemble_export(ensemble, ckpts, out, meta, "onnx", root=root), "check_gap": gap}
