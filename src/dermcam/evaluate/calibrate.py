"""``dermcam calibrate``, and training's calibration of its best checkpoint.

Predicts the validation split (fp32, as validation scores), fits a calibration
(:mod:`dermcam.evaluate.calibration`), optionally chooses an operating point on the calibrated
probabilities (:mod:`dermcam.evaluate.operating`) and stores both in the checkpoint's sidecar
(:func:`dermcam.store.checkpoint.annotate_checkpoint`: atomic, and the reason it is the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, LockedError
from dermcam.evaluate.operating import OperatingPointSpec, class_index, parse_operating_point
from dermcam.progress import Progress

if TYPE_CHECKING:
    from dermcam.store.checkpoint import Checkpoint


@dataclass
class CalibrationResult:
    """What was fitted, on which images, and the operating point chosen (if any)."""

    checkpoint_id: str
    dataset: str
    split: str
    calibration: dict[str, Any]
    operating_point: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``dermcam calibrate --json`` prints)."""
        return {"checkpoint": self.checkpoint_id, "dataset": self.dataset, "split": self.split,
                "calibration": self.calibration, "operating_point": self.operating_point,
                "warnings": self.warnings, "notes": self.notes}


def calibrate(ref: str | Path | None = None, *, dataset: str | None = None, operating_point: str | None = None,
              vector: bool = False, device: str = "auto", precision: str = "auto", batch_size: int = 64,
              root: Path | None = None, progress: Progress | None = None) -> CalibrationResult:
    """Calibrate a store checkpoint (default: the best) on the validation split of its data set, or
    of ``dataset``; with ``operating_point`` (``mel:sensitivity=0.90``) also choose that threshold.

    For checkpoints trained before calibration existed, or to calibrate on another set's val split.
    A bad spec, an unknown class, an exported file (never changed: import it first) or a run that is
    training right now are refused before anything is loaded or predicted.
    """
    from dermcam.store.exported import is_exported_file
    from dermcam.store.manage import run_is_active
    from dermcam.store.references import find_checkpoint

    spec = parse_operating_point(operating_point) if operating_point is not None else None
    if ref is not None and is_exported_file(ref):
        raise BadInputError(f"{ref} is an exported file, which is never changed; import it with "
                            "'dermcam ckpt restore FILE' and calibrate the imported checkpoint")
    found = find_checkpoint(ref, root)
    ckpt = found.checkpoint
    if spec is not None:
        class_index(spec, list(ckpt.sidecar["classes"]))
    if run_is_active(ckpt.run_id, root):
        raise LockedError(f"run {ckpt.run_id} is training right now; it calibrates its best checkpoint when it "
                          "finishes")
    result = calibrate_checkpoint(ckpt, spec, dataset=dataset, vector=vector, device=device, precision=precision,
                                  batch_size=batch_size, root=root, progress=progress)
    result.warnings[:0] = found.warnings  # damaged checkpoints 'best' passed over
    if ckpt.sidecar.get("tracking"):  # a tracked run's checkpoint: the fit goes to that run too (dermcam.track)
        from dermcam.track.base import numbers
        from dermcam.track.hooks import log_result

        fitted = numbers({"calibration": result.calibration, "operating_point": result.operating_point or {}}, depth=3)
        log_result(ckpt.sidecar, f"calibrate/{result.dataset}", fitted, root=root, progress=progress)
    return result


def calibrate_checkpoint(ckpt: Checkpoint, spec: OperatingPointSpec | None, *, dataset: str | None = None,
                         vector: bool = False, device: str = "auto", precision: str = "auto", batch_size: int = 64,
                         root: Path | None = None, progress: Progress | None = None) -> CalibrationResult:
    """Fit, choose and store, for one checkpoint (training calls this for its best one while it holds
    its run's lock; :func:`calibrate` is the checked entry point).

    Without ``spec`` a stored operating point is chosen again for its own target: its threshold was a
    calibrated probability of the old calibration and means nothing under the new one.
    """
    from dermcam.data.metadata import model_metadata
    from dermcam.evaluate.calibration import apply, fit
    from dermcam.evaluate.evaluation import scored_split
    from dermcam.evaluate.operating import check_labels, choose, spec_of
    from dermcam.evaluate.predict import predict
    from dermcam.models.device import resolve_precision, select_device
    from dermcam.store.checkpoint import annotate_checkpoint
    from dermcam.store.files import utc_now
    from dermcam.store.inference import model_from_checkpoint

    sidecar = ckpt.sidecar
    classes = list(sidecar["classes"])
    notes = []
    if spec is None and sidecar.get("operating_point"):
        spec = spec_of(sidecar["operating_point"])
        notes.append(f"operating point {spec} chosen again on the new calibration")
    val = scored_split(sidecar, dataset, "val", root)
    if spec is not None:
        check_labels(spec, classes, val.y_true, f"the val split of data set '{val.data.name}'")
    model = model_from_checkpoint(ckpt)
    dev = select_device(device)
    model.to(dev)
    raw = predict(model, val.data.images, val.rows, preprocessing=sidecar["preprocessing"], device=dev,
                  precision=resolve_precision(precision, dev, scoring=True), batch_size=batch_size,
                  progress=progress, description="calibrate on val",
                  metadata=model_metadata(sidecar, val.index))  # a metadata model: the val rows' own
    calibration = {**fit(val.y_true, raw, val.groups, vector=vector), "created": utc_now(),
                   "fitted_on": {"dataset": val.data.name, "split": "val", "n": len(val.rows),
                                 "lesions": len(set(map(str, val.groups))), "fingerprint": val.data.fingerprint}}
    fields: dict[str, Any] = {"calibration": calibration}
    if spec is not None:
        c = classes.index(spec.name)
        probs = apply(raw, {"id": ckpt.id, "calibration": calibration})
        fields["operating_point"] = {**choose(probs[:, c], val.y_true == c, spec), "created": utc_now()}
        if not fields["operating_point"]["validation"]["reached"]:
            val.warnings.append(f"operating point {spec}: no threshold reaches the target on the val split; "
                                "the highest threshold is used")
    annotate_checkpoint(ckpt, fields, root=root)
    return CalibrationResult(ckpt.id, val.data.name, "val", calibration, fields.get("operating_point"),
                             val.warnings, notes)
