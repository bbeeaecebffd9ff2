"""The served model: loaded once, answering exactly as ``dermcam explain`` does.

Every step is the one the other commands use, so the server cannot drift from them:
:func:`dermcam.store.inference.load_for_inference` (checkpoints, ``ensemble:NAME``, exported files,
validated as today: a damaged file is exit 4 before the server listens),
:func:`dermcam.data.images.decode_image` (the pixel cap against decompression bombs, EXIF orientation,
the checkpoint's cache size), :func:`dermcam.data.geometry.batch_input` (the one preprocessing path),
:func:`dermcam.explain.tta.predict` and :func:`dermcam.evaluate.operating.model_outputs` (calibrated
probabilities and the operating point's decisions), and Grad-CAM through :mod:`dermcam.explain` with
overlays from :func:`dermcam.explain.render.render_overlay`.

An uploaded file is untrusted: its name is only ever shown (escaped, shortened), its bytes go through
the same decoder as a file on disk, and anything wrong with it is a :class:`BadInputError` naming it.

A model trained with patient metadata gets each upload's ``age``, ``sex`` and ``site`` form fields
(:func:`dermcam.data.metadata_input.form_row`), encoded as training encoded them; the prediction and the
map both read them (:mod:`dermcam.explain.metadata`), and each answer says which fields the model read
and which it was given.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam import __version__
from dermcam.checks import is_control
from dermcam.errors import BadInputError, DermcamError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from dermcam.evaluate.operating import ModelOutputs

CAM_METHOD = "gradcam"
MAX_OVERLAY_SIDE = 1024  # overlays are drawn on the photo shrunk to this (the map is model-sized anyway)
MIN_OVERLAY_WIDTH = 480  # and on a small photo enlarged (by a whole factor) to this, so its legend is legible
MAX_NAME = 120  # characters of an uploaded file name kept for messages and results


def upload_name(filename: str | None, index: int) -> str:
    """A name to show for the ``index``-th uploaded file: its file name without folders or control
    characters, shortened; ``image N`` when it has none."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join("?" if is_control(c) else c for c in name).strip()
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 3] + "..."
    return name or f"image {index + 1}"


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its name, its pixels as the model's cache holds them, and for an overlay the
    photo (upright 8-bit RGB, at most :data:`MAX_OVERLAY_SIDE` pixels on its longer side; a small one
    enlarged towards :data:`MIN_OVERLAY_WIDTH`)."""

    name: str
    pixels: np.ndarray
    photo: Image.Image | None = None
    metadata: Mapping[str, str] | None = None  # its form fields as a row (age, sex, localization); None: none


def read_upload(name: str, data: bytes, preprocessing: Mapping[str, Any], *, photo: bool = False) -> Upload:
    """Decode an uploaded file exactly as ``explain`` decodes a file on disk (and with ``photo`` the
    photo an overlay is drawn on); a one-line :class:`BadInputError` naming it when it is empty, no image,
    truncated or over the pixel cap. CPU work that runs beside the model's thread, not on it."""
    from PIL import Image

    from dermcam.data.geometry import cache_size
    from dermcam.data.images import decode_image, load_image

    if not data:
        raise BadInputError(f"{name}: empty file (0 bytes)")
    try:
        pixels, _ = decode_image(bytes(data), cache_size(preprocessing))
    except DermcamError as exc:
        raise BadInputError(f"{name}: {exc}") from None
    if not photo:
        return Upload(name, pixels)
    try:
        full = load_image(io.BytesIO(data))  # type: ignore[arg-type]  # Pillow reads a file object
    except DermcamError as exc:  # its message starts with the file object where a path would be
        raise BadInputError(f"{name}: {str(exc).split(': ', 1)[-1]}") from None
    full.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.LANCZOS)
    scale = math.ceil(MIN_OVERLAY_WIDTH / full.width)
    if scale > 1 and max(full.size) * scale <= MAX_OVERLAY_SIDE:
        full = full.resize((full.width * scale, full.height * scale), Image.Resampling.BICUBIC)
    return Upload(name, pixels, full)


@dataclass(frozen=True)
class Answer:
    """What the model said about one image, as the API returns it."""

    name: str
    probabilities: dict[str, float]
    predicted: str  # the argmax
    decision: str  # the operating point's rule (the argmax without one)
    operating_point: str | None  # "mel: above threshold 0.231"
    cam: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # the fields the model reads and those this image was given

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "predicted": self.predicted, "decision": self.decision,
                "operating_point": self.operating_point, "probabilities": self.probabilities, "cam": self.cam,
                "metadata": self.metadata}


def form_rows(count: int, age: Sequence[str] | None = None, sex: Sequence[str] | None = None,
              site: Sequence[str] | None = None) -> list[dict[str, str] | None]:
    """The patient metadata of ``count`` uploaded images from a request's ``age``, ``sex`` and ``site``
    fields: each field given once (for every image) or once per image, in the order of the files; a
    one-line BadInputError for any other count or a value :func:`dermcam.data.metadata_input.form_row`
    refuses (naming the image when there are several)."""
    from dermcam.data.metadata_input import form_row

    fields = {"age": list(age or []), "sex": list(sex or []), "site": list(site or [])}
    for name, values in fields.items():
        if len(values) not in (0, 1, count):
            raise BadInputError(f"{len(values)} '{name}' fields for {count} images: send it once (for every image) "
                                "or once per image, in the order of the files")
    rows = []
    for i in range(count):
        picked = {name: (values[i] if len(values) == count else values[0]) if values else None
                  for name, values in fields.items()}
        try:
            rows.append(form_row(**picked))
        except BadInputError as exc:
            raise BadInputError(f"image {i + 1}: {exc}" if count > 1 else str(exc)) from None
    return rows


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (a metric that could not be computed) as None: JSON has
    neither, and a sidecar may hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class ServedModel:
    """A model ready to answer: weights on their device, the sidecar that says how to read its outputs,
    and the layers Grad-CAM explains. Its methods run torch and are called from one thread at a time
    (the batcher's worker, :mod:`dermcam.serve.batching`)."""

    def __init__(self, model: torch.nn.Module, sidecar: dict[str, Any], device: torch.device,
                 warnings: Sequence[str] = ()) -> None:
        from dermcam.models.ensemble import EnsembleModel

        self.model = model.eval()
        self.sidecar = sidecar
        self.device = device
        self.classes = list(sidecar["classes"])
        self.preprocessing = sidecar["preprocessing"]
        self.warnings = list(warnings)
        self.is_ensemble = isinstance(model, EnsembleModel)
        self.layers = self._layers()
        from dermcam.data.metadata_input import model_fields

        self.fields = model_fields(sidecar)  # the patient metadata it reads ([]: none)

    @classmethod
    def load(cls, ref: str | Path | None, *, device: str = "auto", root: Path | None = None) -> ServedModel:
        """Load ``ref`` (anything ``explain -c`` takes; default: the store's best) once, validated as every
        command validates it: NotFoundError (3), CorruptError (4), BadInputError (2)."""
        from dermcam.models.device import select_device
        from dermcam.store.inference import load_for_inference

        refuse_onnx(ref)
        warnings: list[str] = []
        model, sidecar = load_for_inference(ref, root, calibrated=True, notes=warnings)
        target = select_device(device)
        return cls(model.to(target), sidecar, target, warnings)

    def _layers(self) -> list[str]:
        """The layer Grad-CAM explains (an ensemble: each member's), found once at start-up."""
        from dermcam.models.layers import find_target_layer

        if self.is_ensemble:
            from dermcam.explain.ensemble import member_layers

            return member_layers(self.model, None)  # type: ignore[arg-type]
        try:
            return [find_target_layer(self.model)]
        except DermcamError:
            return []  # no spatial layer: predictions still work, ?cam=1 says why it cannot

    def _metadata(self, uploads: Sequence[Upload]) -> tuple[Any, list[dict[str, Any] | None]]:
        """The uploads' encoded metadata for the model (None for a model that reads none) and what each
        answer says of it (which fields the model reads, which this image was given)."""
        if not self.fields:  # fields sent anyway: the answer says they were ignored
            return None, [None if u.metadata is None else
                          {"fields": [], "known": [], "answered": "the model reads no metadata (the fields sent "
                                                                  "were ignored)", "source": "form"} for u in uploads]
        from dermcam.data.metadata import model_metadata
        from dermcam.data.metadata_input import frame_of, image_metadata

        frame = frame_of([u.metadata for u in uploads])
        records = image_metadata(self.sidecar, frame, ["form" if u.metadata is not None else None for u in uploads])
        return model_metadata(self.sidecar, frame), list(records)

    def _outputs(self, pixels: Sequence[np.ndarray], rows: Any = None) -> tuple[torch.Tensor, ModelOutputs]:
        """The model's input for cache-sized pixels and its calibrated outputs (explain's path); ``rows``:
        their encoded metadata, for a model that reads it."""
        from dermcam.data.geometry import batch_input
        from dermcam.evaluate.operating import model_outputs
        from dermcam.explain.metadata import bind
        from dermcam.explain.tta import predict

        x = batch_input(np.stack([np.asarray(p, dtype=np.uint8) for p in pixels]), self.preprocessing)
        return x, model_outputs(predict(bind(self.model, rows), x)[1], self.sidecar, calibrated=True)

    def _answer(self, name: str, outputs: ModelOutputs, i: int, note: str | None,
                metadata: dict[str, Any] | None = None) -> Answer:
        probs = outputs.probs[i]
        return Answer(name, {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
                      self.classes[int(np.argmax(probs))], self.classes[int(outputs.decisions[i])], note,
                      metadata=metadata)

    def predict(self, uploads: Sequence[Upload]) -> list[Answer]:
        """One forward pass over ``uploads`` (each with its own metadata): an answer per image, in order."""
        rows, records = self._metadata(uploads)
        _, outputs = self._outputs([u.pixels for u in uploads], rows)
        return [self._answer(u.name, outputs, i, note, records[i])
                for i, (u, note) in enumerate(zip(uploads, outputs.notes()))]

    def explain(self, upload: Upload) -> tuple[Answer, np.ndarray]:
        """The answer and the Grad-CAM map (model input size) of the decided class. Torch only: the
        overlay is drawn by :meth:`overlay`, off the model's thread."""
        if not self.layers:
            raise BadInputError(f"this model ({self.sidecar.get('backbone')}) has no spatial layer to explain; "
                                "ask without cam=1")
        rows, records = self._metadata([upload])
        x, outputs = self._outputs([upload.pixels], rows)
        answer = self._answer(upload.name, outputs, 0, outputs.notes()[0], records[0])
        return answer, self._maps(x, [self.classes.index(answer.decision)], rows)[0]

    def overlay(self, upload: Upload, answer: Answer, cam_map: np.ndarray) -> Answer:
        """``answer`` with the map drawn over the upload's photo as ``dermcam explain`` draws it, as a
        base64 PNG (needs an upload read with ``photo=True``)."""
        from dermcam.data.geometry import cache_size, cover_box
        from dermcam.explain.render import render_overlay

        assert upload.photo is not None, "read_upload(..., photo=True) keeps the photo an overlay needs"
        image = render_overlay(upload.photo, cam_map, label=answer.decision,
                               probability=answer.probabilities[answer.decision], note=answer.operating_point,
                               view=cover_box(upload.photo.size, cache_size(self.preprocessing)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cam = {"method": CAM_METHOD, "layer": "; ".join(self.layers), "target": answer.decision,
               "width": image.width, "height": image.height,
               "png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}
        return Answer(answer.name, answer.probabilities, answer.predicted, answer.decision, answer.operating_point, cam,
                      answer.metadata)

    def _maps(self, x: torch.Tensor, targets: list[int], rows: Any = None) -> np.ndarray:
        """Grad-CAM maps of ``targets`` at the start-up layers, as ``explain`` computes them (with the
        images' metadata ``rows`` bound, for a model that reads it)."""
        if rows is not None:
            from dermcam.explain.ensemble import grouped_maps

            return grouped_maps(self.model, x, CAM_METHOD, targets, rows,
                                layer=None if self.is_ensemble else self.layers[0],
                                member_layers=self.layers if self.is_ensemble else None)
        if self.is_ensemble:
            from dermcam.explain.ensemble import ensemble_cam

            return ensemble_cam(self.model, x, CAM_METHOD, targets, self.layers)  # type: ignore[arg-type]
        from dermcam.explain.methods import compute_cam

        return compute_cam(self.model, x, CAM_METHOD, target_layer=self.layers[0], target=targets).maps

    def identity(self) -> dict[str, Any]:
        """What identifies the weights (id, sha256, backbone), as ``explain`` records it."""
        from dermcam.explain.pipeline import checkpoint_identity

        return checkpoint_identity(self.sidecar)

    def card(self) -> dict[str, Any]:
        """The model as ``GET /v1/model`` describes it: identity, classes, input, calibration, operating
        point, training data, the sidecar's metrics, and what the model is (not) for."""
        from dermcam.data.geometry import cache_size
        from dermcam.evaluate.calibration import describe
        from dermcam.report.sections import DISCLAIMER, INTENDED_USE, NOT_INTENDED

        sidecar = self.sidecar
        calibration = sidecar.get("calibration")
        point = sidecar.get("operating_point") if calibration else None
        return finite({
            **self.identity(), "kind": sidecar.get("kind") or ("exported" if "path" in sidecar else "checkpoint"),
            "classes": self.classes, "input_size": list(self.preprocessing["input_size"]),
            "cache_size": list(cache_size(self.preprocessing)),
            "calibration": {"method": calibration["method"], "temperature": calibration.get("temperature"),
                            "described": describe(calibration)} if calibration else None,
            "operating_point": {k: point[k] for k in ("class", "metric", "target", "threshold", "validation")
                                if k in point} if point else None,
            "dataset": sidecar.get("dataset") or None, "metrics": sidecar.get("metrics") or {},
            "created": sidecar.get("created"), "cam": {"method": CAM_METHOD, "layer": "; ".join(self.layers) or None},
            "metadata": self.metadata_card(),
            "device": str(self.device), "threads": _threads(), "dermcam_version": __version__,
            "disclaimer": DISCLAIMER, "intended_use": INTENDED_USE, "not_intended_for": NOT_INTENDED,
        })


    def metadata_card(self) -> dict[str, Any] | None:
        """What a form needs to ask for the model's patient metadata: its fields, the sites it knows, the
        sexes and the age range; None for a model that reads none."""
        if not self.fields:
            return None
        from dermcam.data.metadata_input import model_sites
        from dermcam.metadata_spec import AGE_RANGE, SEXES

        return {"fields": list(self.fields), "form_fields": {"age": "age", "sex": "sex", "site": "site"},
                "sites": model_sites(self.sidecar) if "site" in self.fields else [],
                "sexes": list(SEXES) if "sex" in self.fields else [],
                "age_range": list(AGE_RANGE) if "age" in self.fields else None,
                "unknown": "leave a field empty when it is unknown; a site the model never saw counts as unknown"}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def refuse_onnx(ref: str | Path | None) -> None:
    """An ONNX file cannot be served yet (the server runs torch models): one line saying what to serve."""
    from dermcam.filekind import sniff_file

    if ref is None or not Path(str(ref)).is_file():
        return
    path = Path(str(ref))
    kind = sniff_file(path)
    if path.suffix.lower() == ".onnx" or (kind is not None and kind.code == "onnx"):
        raise BadInputError(f"{path}: serving an ONNX model is not supported yet; serve the checkpoint or ensemble "
                            "it was exported from, or its .safetensors export")
