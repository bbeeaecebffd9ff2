"""``dermcam explain``: classify dermoscopy photos and show where the model looked.

For every image: the class probabilities, an overlay PNG at the photo's own resolution (the CAM of
the predicted class, or of ``target``) and a JSON sidecar saying exactly what produced it
(checkpoint id and sha256, method, layer, target, input size, dermcam version), so an overlay found
in a report months later can be traced and reproduced.

A bad file (missing, unreadable, truncated, not an image, a decompression bomb) is reported on one
line and skipped: the other images are still explained. Images are read with EXIF orientation
applied (phone dermatoscopes store rotated JPEGs), 16-bit and float images are scaled to 8 bits, and
transparency is dropped.

A model trained with patient metadata (``train --metadata age,sex,site``) reads each image's age, sex
and site from a CSV (``metadata``, else a ``metadata.csv`` beside the images:
:mod:`dermcam.data.metadata_input`); the prediction and the map are both computed with it
(:mod:`dermcam.explain.metadata`), and each sidecar says which fields the model read and which it was
given ("answered without metadata" when none).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam import __version__
from dermcam.data.images import decode_image, load_image
from dermcam.errors import BadInputError, DermcamError, ExitCode, NotFoundError
from dermcam.evaluate.operating import applied
from dermcam.progress import Progress
from dermcam.store.files import atomic_path, atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch
    from PIL import Image


SCHEMA = "dermcam.explain/1"


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


BATCH_SIZE = 8


@dataclass
class ExplainedImage:
    """One image that went through: what the model said and where the files are."""

    image: Path
    predicted: str
    probabilities: dict[str, float]
    target: str | None
    overlay: Path | None
    sidecar: Path
    npy: Path | None = None
    faithfulness: dict[str, float] | None = None
    decision: str | None = None  # the operating point's rule (the argmax without one)
    operating_point: str | None = None  # "mel: above threshold 0.231"
    metadata: dict[str, Any] | None = None  # fields the model reads, those known for this image, the source

    def to_dict(self) -> dict[str, Any]:
        return {"image": str(self.image), "status": "ok", "predicted": self.predicted,
                "decision": self.decision, "operating_point": self.operating_point,
                "probabilities": self.probabilities, "target": self.target,
                "overlay": str(self.overlay) if self.overlay else None, "sidecar": str(self.sidecar),
                "npy": str(self.npy) if self.npy else None, "faithfulness": self.faithfulness,
                "metadata": self.metadata}


@dataclass
class ExplainFailure:
    """One image that could not be used, and why (one line, naming the file)."""

    image: Path
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": str(self.image), "status": "error", "error": self.error}


@dataclass
class ExplainReport:
    checkpoint: dict[str, Any]
    classes: list[str]
    method: str | None
    layer: str | None
    tta: bool
    out_dir: Path
    inputs: list[Path] = field(default_factory=list)  # every input image, in the order given
    results: list[ExplainedImage] = field(default_factory=list)
    failures: list[ExplainFailure] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # what was applied: method, temperature (None: raw)
    operating_point: dict[str, Any] | None = None  # class, metric, target, threshold
    warnings: list[str] = field(default_factory=list)  # damaged checkpoints 'best' passed over, one line each
    metadata: dict[str, Any] | None = None  # a metadata model: its fields, the CSVs read, images without any

    @property
    def exit_code(self) -> ExitCode:
        """OK; PARTIAL when some images failed; BAD_INPUT when none could be used."""
        if not self.failures:
            return ExitCode.OK
        return ExitCode.PARTIAL if self.results else ExitCode.BAD_INPUT

    def rows(self) -> list[ExplainedImage | ExplainFailure]:
        """Results and failures in input order."""
        order = {path: i for i, path in enumerate(self.inputs)}
        return sorted([*self.results, *self.failures], key=lambda r: order.get(r.image, len(order)))

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "classes": self.classes, "method": self.method,
                "layer": self.layer, "tta": self.tta, "calibration": self.calibration,
                "operating_point": self.operating_point, "out_dir": str(self.out_dir),
                "images": [r.to_dict() for r in self.rows()],
                "ok": len(self.results), "failed": len(self.failures), "warnings": self.warnings,
                "metadata": self.metadata_summary()}

    def metadata_summary(self) -> dict[str, Any] | None:
        """The fields the model reads, the CSV files read, and how many explained images had none of
        them; None for a model that reads no metadata."""
        if self.metadata is None:
            return None
        without = sum(1 for r in self.results if r.metadata is not None and not r.metadata["known"])
        return {**self.metadata, "images": len(self.results), "without_metadata": without}


def collect_images(paths: Iterable[Path],
                   recursive: bool = False) -> tuple[list[tuple[Path, Path]], list[ExplainFailure]]:
    """(image, output name without suffix) for every input, plus failures for paths that do not exist.

    A named file is taken whatever its extension (and fails later if it is not an image); a folder
    contributes its files with an image extension, recursively with ``recursive``, and its
    sub-folders are mirrored in the output names so equal file names never overwrite each other.
    """
    found: list[tuple[Path, Path]] = []
    failures: list[ExplainFailure] = []
    for path in map(Path, paths):
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            images = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend((p, p.relative_to(path).with_suffix("")) for p in images)
        elif path.exists():
            found.append((path, Path(path.stem)))
        else:
            failures.append(ExplainFailure(path, f"{path}: no such file or folder"))
    if not found and not failures:
        raise NotFoundError("no images found in " + ", ".join(str(p) for p in paths)
                            + (" (use --recursive for sub-folders)" if not recursive else ""))
    return _unique_names(found), failures


def _unique_names(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """Drop repeated inputs; give ``a.jpg`` and ``a.png`` the names ``a`` and ``a-2``."""
    seen_inputs: set[Path] = set()
    taken: set[str] = set()
    unique = []
    for image, name in found:
        key = image.resolve()
        if key in seen_inputs:
            continue
        seen_inputs.add(key)
        candidate, n = name, 1
        while str(candidate).lower() in taken:
            n += 1
            candidate = name.with_name(f"{name.name}-{n}")
        taken.add(str(candidate).lower())
        unique.append((image, candidate))
    return unique


def resolve_target(target: str | int | None, classes: Sequence[str]) -> int | None:
    """A class name (``mel``) or index (``2``) -> index; a one-line error listing the classes."""
    if target is None:
        return None
    text = str(target).strip()
    if text in classes:
        return list(classes).index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise BadInputError(f"unknown target class {text!r}; this model's classes are {', '.join(classes)}")


def checkpoint_identity(sidecar: dict[str, Any]) -> dict[str, Any]:
    """What identifies the weights: store id (or exported file name), sha256 of the weights file, backbone;
    for an ensemble also its members (id, sha256, backbone, weight)."""
    sha = sidecar.get("sha256") or (sidecar.get("weights") or {}).get("sha256")
    identity = {"id": sidecar.get("id"), "sha256": sha, "backbone": sidecar.get("backbone")}
    if sidecar.get("members"):
        identity["members"] = sidecar["members"]
    return identity


@dataclass
class _Loaded:
    """One input image, read twice: at full size for the overlay, as the cache holds it for the model."""

    source: Path
    name: Path
    photo: Image.Image
    pixels: np.ndarray
    row: dict[str, str] | None = None  # its patient metadata (age, sex, localization), for a model that reads it
    row_source: str | None = None  # the CSV it came from


def _load(source: Path, name: Path, preprocessing: dict[str, Any]) -> _Loaded:
    """The photo (upright 8-bit RGB) and its pixels decoded exactly as ``prepare`` decodes a training
    image (:func:`dermcam.data.images.decode_image` at the checkpoint's cache size), so that explain,
    evaluate and training's validation feed the model the same tensor for the same file."""
    from dermcam.data.geometry import cache_size

    photo = load_image(source)
    try:
        pixels, _ = decode_image(source, cache_size(preprocessing))
    except DermcamError as exc:
        raise BadInputError(f"{source}: {exc}") from None
    return _Loaded(source, name, photo, pixels)


def _write_outputs(image: Image.Image, source: Path, name: Path, out_dir: Path, report: ExplainReport,
                   sidecar: dict[str, Any], probs: np.ndarray, decision: int, note: str | None, target: int | None,
                   cam_map: np.ndarray | None, save_npy: bool, scores: dict[str, float] | None,
                   metadata: dict[str, Any] | None = None) -> ExplainedImage:
    from dermcam.data.geometry import cache_size, cover_box
    from dermcam.explain.render import render_overlay, save_png

    classes = report.classes
    predicted = classes[int(np.argmax(probs))]
    probabilities = {c: round(float(p), 6) for c, p in zip(classes, probs)}
    target_name = classes[target] if target is not None else None
    overlay = npy = None
    if cam_map is not None and target is not None:
        view = cover_box(image.size, cache_size(sidecar["preprocessing"]))
        overlay = save_png(render_overlay(image, cam_map, label=target_name, probability=float(probs[target]),
                                          note=note, view=view), out_dir / name.with_name(f"{name.name}.cam.png"))
        if save_npy:
            npy = out_dir / name.with_name(f"{name.name}.cam.npy")
            with atomic_path(npy) as tmp, open(tmp, "wb") as handle:
                np.save(handle, cam_map.astype(np.float32), allow_pickle=False)
    meta_path = out_dir / name.with_name(f"{name.name}.json")
    atomic_write_json(meta_path, {
        "schema": SCHEMA, "image": str(source), "image_size": list(image.size),
        "checkpoint": report.checkpoint, "classes": classes, "predicted": predicted,
        "decision": classes[decision], "operating_point": note, "calibration": report.calibration,
        "probabilities": probabilities, "method": report.method if overlay else None,
        "target_class": target_name, "target_layer": report.layer if overlay else None, "tta": report.tta,
        "input_size": list(sidecar["preprocessing"]["input_size"]),
        "overlay": overlay.name if overlay else None, "npy": npy.name if npy else None,
        "faithfulness": scores, "metadata": metadata, "dermcam_version": __version__,
    })
    return ExplainedImage(source, predicted, probabilities, target_name, overlay, meta_path, npy, scores,
                          classes[decision], note, metadata)


def _explain_batch(model: torch.nn.Module, batch: list[_Loaded], report: ExplainReport,
                   sidecar: dict[str, Any], target: int | None, cam: bool, save_npy: bool, score: bool,
                   reshape_transform: Any, calibrated: bool, member_layers: list[str] | None = None) -> None:
    """Probabilities first (calibrated, through the one path every command shares), then the maps of
    each image's decision (or of ``target``): with an operating point the decision may not be the
    argmax, and the overlay must explain what the model answered."""
    import torch

    from dermcam.data.geometry import model_input
    from dermcam.evaluate.operating import model_outputs
    from dermcam.explain.faithfulness import faithfulness
    from dermcam.explain.methods import compute_cam
    from dermcam.explain.tta import predict

    x = torch.stack([model_input(item.pixels, sidecar["preprocessing"]) for item in batch])
    rows, records = _batch_metadata(batch, sidecar) if report.metadata is not None else (None, [None] * len(batch))
    if rows is not None:  # the prediction, the maps and the scores all read each image's metadata
        from dermcam.explain.ensemble import grouped_maps
        from dermcam.explain.metadata import bind, grouped_faithfulness

        outputs = model_outputs(predict(bind(model, rows), x, tta=report.tta)[1], sidecar, calibrated=calibrated)
        chosen = [int(d) if target is None else target for d in outputs.decisions]
        own_maps: Any = [None] * len(batch)
        own_scores: list[dict[str, float] | None] = [None] * len(batch)
        if cam:
            own_maps = grouped_maps(model, x, str(report.method), chosen, rows, layer=report.layer,
                                    member_layers=member_layers, tta=report.tta, reshape_transform=reshape_transform)
        if cam and score:
            measured = grouped_faithfulness(model, x, own_maps, chosen, rows)
            own_scores = [{"deletion_auc": round(d, 6), "insertion_auc": round(i, 6)}
                          for d, i in zip(measured["deletion_auc"], measured["insertion_auc"])]
        _write_batch(batch, report, sidecar, outputs, own_maps, chosen, own_scores, target, cam, save_npy, records)
        return
    outputs = model_outputs(predict(model, x, tta=report.tta)[1], sidecar, calibrated=calibrated)
    targets = [int(d) if target is None else target for d in outputs.decisions]
    maps: np.ndarray | list[None] = [None] * len(batch)
    scores: list[dict[str, float] | None] = [None] * len(batch)
    if cam and member_layers is not None:  # an ensemble: its members' maps, averaged
        from dermcam.explain.ensemble import ensemble_cam

        assert report.method is not None
        maps = ensemble_cam(model, x, report.method, targets, member_layers, tta=report.tta)
    elif cam:
        assert report.method is not None
        maps = compute_cam(model, x, report.method, target_layer=report.layer, target=targets,
                           tta=report.tta, reshape_transform=reshape_transform).maps
    if cam:
        if score:  # the model's own forward: for an ensemble, the ensemble's probabilities
            measured = faithfulness(model, x, maps, targets)
            scores = [{"deletion_auc": round(d, 6), "insertion_auc": round(i, 6)}
                      for d, i in zip(measured["deletion_auc"], measured["insertion_auc"])]
    _write_batch(batch, report, sidecar, outputs, maps, targets, scores, target, cam, save_npy, records)


def _write_batch(batch: list[_Loaded], report: ExplainReport, sidecar: dict[str, Any], outputs: Any, maps: Any,
                 targets: list[int], scores: list[dict[str, float] | None], target: int | None, cam: bool,
                 save_npy: bool, records: list[dict[str, Any] | None]) -> None:
    for item, p, d, note, m, t, s, r in zip(batch, outputs.probs, outputs.decisions, outputs.notes(), maps,
                                            targets, scores, records):
        report.results.append(_write_outputs(item.photo, item.source, item.name, report.out_dir, report, sidecar,
                                             p, int(d), note, t if cam else target, m, save_npy, s, r))


def _batch_metadata(batch: list[_Loaded], sidecar: dict[str, Any]) -> tuple[Any, list[dict[str, Any] | None]]:
    """The batch's encoded metadata for the model (:func:`dermcam.data.metadata.model_metadata`) and,
    per image, what its sidecar says of it (:func:`dermcam.data.metadata_input.image_metadata`)."""
    from dermcam.data.metadata import model_metadata
    from dermcam.data.metadata_input import frame_of, image_metadata

    frame = frame_of([item.row for item in batch])
    return model_metadata(sidecar, frame), list(image_metadata(sidecar, frame, [i.row_source for i in batch]))


class _MetadataRows:
    """Where each image's metadata comes from: the ``--metadata`` file, else the first ``metadata.csv``
    in the image's folder or a folder above it up to the folder named on the command line (each read
    once, before any image is)."""

    def __init__(self, given: Any) -> None:
        self.given = given  # a read MetadataFile, or None
        self.found: dict[Path, Any] = {}  # folder -> its metadata.csv read (None: it has none)
        self.used: list[str] = []

    def read_beside(self, images: list[tuple[Path, Path]]) -> None:
        """Read every ``metadata.csv`` the images may use (a bad one: a one-line BadInputError)."""
        from dermcam.data.metadata_input import DEFAULT_NAME, read_metadata_csv

        if self.given is not None:
            return
        for source, name in images:
            for folder in self._folders(source, name):
                if folder not in self.found:
                    path = folder / DEFAULT_NAME
                    self.found[folder] = read_metadata_csv(path, DEFAULT_NAME) if path.is_file() else None

    @staticmethod
    def _folders(source: Path, name: Path) -> list[Path]:
        return [source.parents[k] for k in range(min(len(name.parts), len(source.parents)))]

    def row(self, source: Path, name: Path) -> tuple[dict[str, str] | None, str | None]:
        """(the image's row or None, the CSV read for it or None)."""
        files = [self.given] if self.given is not None else \
            [f for f in (self.found.get(d) for d in self._folders(source, name)) if f is not None][:1]
        for table in files:
            if str(table.path) not in self.used:
                self.used.append(str(table.path))
            return table.lookup(source), str(table.path)
        return None, None


def explain(paths: Sequence[str | Path], *, checkpoint: str | Path | None = None,
            out_dir: Path = Path("dermcam-explain"), recursive: bool = False, method: str = "gradcam",
            target: str | int | None = None, layer: str | None = None, tta: bool = False, cam: bool = True,
            save_npy: bool = False, score: bool = False, calibrated: bool = True, device: str = "auto",
            batch_size: int = BATCH_SIZE, threads: int | str | None = None,
            progress: Progress | None = None, metadata: str | Path | None = None) -> ExplainReport:
    """Classify and explain images; write ``<name>.cam.png`` (unless ``cam`` is false), ``<name>.json``
    and with ``save_npy`` ``<name>.cam.npy`` (the map at the model's input size) into ``out_dir``.

    ``checkpoint``: anything :func:`dermcam.store.inference.load_for_inference` accepts (default: the
    best checkpoint in the store). ``target``: class name or index to explain instead of each
    prediction. ``layer``: module name (default: :func:`dermcam.models.find_target_layer`).
    ``score``: add deletion/insertion AUC (costs ~40 extra forwards per image).
    ``calibrated``: calibrated probabilities and the operating point's decisions when the checkpoint
    has them (False: the raw softmax and argmax), exactly as ``evaluate`` reports them.
    ``device``: where the model runs (auto: CUDA when present); maps and scores are computed in fp32
    (``explain.cam`` turns autocast off). ``batch_size``: images per forward/backward pass.
    ``threads``: torch CPU threads (:func:`dermcam.models.device.resolve_threads`; auto: the idle cores;
    the CLI's default). None keeps torch's count: a caller inside a training process (the end of
    ``train``, a cross-validation, a distillation) must not change the count its later runs train with.
    ``metadata``: a CSV of the images' age, sex and site (:func:`dermcam.data.metadata_input.read_metadata_csv`)
    for a model that reads them; without it a ``metadata.csv`` beside the images is used when there is
    one. An image without a row is answered without metadata (and its sidecar says so); a model that
    reads none ignores the file (a warning says so).
    Bad images become :class:`ExplainFailure` entries; everything else raises.
    """
    from dermcam.explain.cam import resolve_layer
    from dermcam.explain.methods import METHODS
    from dermcam.models.layers import find_target_layer, reshape_transform_for
    from dermcam.store.inference import load_for_inference

    if method not in METHODS:
        raise BadInputError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if score and not cam:
        raise BadInputError("--score measures the CAM, so it cannot be combined with --no-cam")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError("--batch-size must be a whole number of 1 or more")
    from dermcam.models.device import apply_threads

    if threads is not None:
        apply_threads(threads)  # checked before any file is read, set before the model's first torch op

    given = None
    if metadata is not None:  # a bad file is refused before the model loads
        from dermcam.data.metadata_input import read_metadata_csv

        given = read_metadata_csv(metadata)
    images, failures = collect_images([Path(p) for p in paths], recursive)
    notes: list[str] = []
    model, sidecar = load_for_inference(checkpoint, calibrated=calibrated, notes=notes)  # imports torch (start-up)
    meta_rows, meta_block = _metadata_source(given, images, sidecar, notes)
    from dermcam.models.device import select_device

    model.to(select_device(device))  # before any image is read
    classes = list(sidecar["classes"])
    target_index = resolve_target(target, classes)
    member_layers = None
    if cam and sidecar.get("kind") == "ensemble":
        from dermcam.explain.ensemble import member_layers as layers_of

        member_layers = layers_of(model, layer)
        layer = "; ".join(f"{m['id']}: {name}" for m, name in zip(sidecar["members"], member_layers))
    elif cam:
        layer = layer or find_target_layer(model)
        resolve_layer(model, layer)  # a wrong --layer fails now, not once per image
    calibration, point = applied(sidecar, calibrated=calibrated)
    report = ExplainReport(checkpoint=checkpoint_identity(sidecar), classes=classes,
                           method=method if cam else None, layer=layer if cam else None, tta=tta,
                           out_dir=Path(out_dir), failures=failures,
                           inputs=[f.image for f in failures] + [p for p, _ in images],
                           calibration=calibration, operating_point=point, warnings=notes,
                           metadata=meta_block)
    reshape_transform = reshape_transform_for(model) if cam and member_layers is None else None
    progress = progress or Progress()
    progress.start("explain", total=len(images))
    batch: list[_Loaded] = []
    for i, (source, name) in enumerate(images):
        try:
            loaded = _load(source, name, sidecar["preprocessing"])
            if meta_rows is not None:
                loaded.row, loaded.row_source = meta_rows.row(source, name)
            batch.append(loaded)
        except DermcamError as exc:
            report.failures.append(ExplainFailure(source, str(exc)))
            progress.advance()
        if len(batch) == batch_size or (i == len(images) - 1 and batch):
            _explain_batch(model, batch, report, sidecar, target_index, cam, save_npy, score, reshape_transform,
                           calibrated, member_layers)
            progress.advance(len(batch))
            batch = []
    progress.finish()
    if report.metadata is not None and meta_rows is not None:
        report.metadata["files"] = list(meta_rows.used)
    return report


def _metadata_source(given: Any, images: list[tuple[Path, Path]], sidecar: dict[str, Any],
                     notes: list[str]) -> tuple[_MetadataRows | None, dict[str, Any] | None]:
    """Where a metadata model's images get their metadata, and the report's block (fields, files); (None,
    None) for a model that reads none (a warning when a file was given for it)."""
    from dermcam.data.metadata_input import model_fields

    fields = model_fields(sidecar)
    if not fields:
        if given is not None:
            notes.append(f"the model reads no patient metadata: --metadata {given.path} was ignored")
        return None, None
    rows = _MetadataRows(given)
    rows.read_beside(images)
    if given is not None:
        notes.extend(given.notes)
        if images and not any(given.lookup(source) is not None for source, _ in images):
            notes.append(f"--metadata {given.path} names none of the {len(images)} images (matched by file name "
                         "or stem): every image is answered without metadata")
    else:
        notes.extend(n for table in rows.found.values() if table is not None for n in table.notes)
    return rows, {"fields": fields, "files": []}


def write_csv(report: ExplainReport, path: Path) -> Path:
    """One row per input image (failures included, with their error), one probability column per class.

    A metadata model's CSV ends with a ``metadata`` column: what each image was answered with
    ("answered with age, site (sex unknown)", "answered without metadata").
    Text cells (file names, class names, error messages) that a spreadsheet would run as a formula
    (starting with ``= + - @``, tab or CR: a photo named ``=HYPERLINK(...).jpg``) get a leading ``'``,
    as OWASP recommends against CSV injection; number cells are written as numbers.
    """

    def text(value: object) -> str:
        cell = "" if value is None else str(value)
        return "'" + cell if cell.startswith(("=", "+", "-", "@", "\t", "\r")) else cell

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    classes = report.classes
    meta = report.metadata is not None  # a metadata model: what each image was answered with, last
    writer.writerow(["image", "status", "predicted", *(f"p_{c}" for c in classes), "decision", "operating_point",
                     "target", "overlay", "deletion_auc", "insertion_auc", "error", *(["metadata"] if meta else [])])
    for row in report.rows():
        if isinstance(row, ExplainFailure):
            writer.writerow([text(row.image), "error", "", *([""] * len(classes)), "", "", "", "", "", "",
                             text(row.error), *([""] if meta else [])])
            continue
        scores = row.faithfulness or {}
        answered = [(row.metadata or {}).get("answered", "")] if meta else []
        writer.writerow([text(row.image), "ok", text(row.predicted), *(f"{row.probabilities[c]:.6f}" for c in classes),
                         text(row.decision), text(row.operating_point), text(row.target), text(row.overlay),
                         scores.get("deletion_auc", ""), scores.get("insertion_auc", ""), "", *answered])
    atomic_write_bytes(Path(path), buffer.getvalue().encode("utf-8"))
    return Path(path)
