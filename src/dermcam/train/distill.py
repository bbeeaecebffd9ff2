"""Distillation: one student checkpoint trained on an ensemble's calibrated probabilities (``dermcam distill``).

The teacher is a stored ensemble (``ensemble:NAME``); its answer for an image is what ``dermcam evaluate
ensemble:NAME`` scores, the weighted mean of its members' calibrated probabilities. Those answers for the
student's train rows are the *soft targets*: computed once at the start of a run (the teacher's members
each read every train image once, un-augmented: N x members forwards) and kept in the run folder as
``soft_targets.safetensors`` (probabilities, the cache rows they belong to, and in the header the
manifest's sha256, the data set's fingerprint and the classes). A resumed run reads them back and uses
them only when every one of those still matches and the probabilities are probabilities; otherwise it
says why and computes them again. Computing them again is only allowed while the ensemble is the one
the run started with: a resume after the manifest changed, or was deleted, is a one-line error.

The student itself is an ordinary run (:class:`dermcam.train.trainer.Trainer` with ``config.teacher``):
same augmentation, exact resume, checkpoints and sidecars, calibration and test report; its loss is
:class:`dermcam.train.loss.DistillationLoss` and each sidecar records the teacher under ``distillation``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.errors import BadInputError, CorruptError, NotFoundError, first_line
from dermcam.progress import Progress
from dermcam.store.ensembles import PREFIX, Ensemble, check_name, member_checkpoints, read_ensemble

SOFT_TARGETS_FILE = "soft_targets.safetensors"
SOFT_TARGETS_SCHEMA = "dermcam.soft-targets/1"
SUM_TOLERANCE = 1e-3  # a row of float32 probabilities sums to 1 within far less; more means damage


def teacher_name(ref: str) -> str:
    """``NAME`` or ``ensemble:NAME`` -> ``NAME`` (a plain name; BadInputError otherwise)."""
    if not isinstance(ref, str):
        raise BadInputError(f"the teacher must be an ensemble name, not {ref!r}")
    return check_name(ref.removeprefix(PREFIX))


def manifest_sha256(ensemble: Ensemble) -> str:
    """What identifies the teacher: the sha256 of its manifest, which names every member by the sha256 of
    its weights and records each member's calibration, so any change to what the teacher answers changes it."""
    from dermcam.store.files import sha256_file

    return sha256_file(ensemble.path)


def teacher_dataset(ensemble: Ensemble, root: Path | None = None) -> dict[str, str]:
    """The data set (name and fingerprint) every member was trained on: the student's. Members from
    different sets, or a member that records none, cannot say which images the student should learn from."""
    found = {}
    for ckpt in member_checkpoints(ensemble, root):
        dataset = ckpt.sidecar.get("dataset") or {}
        if not dataset.get("name"):
            raise BadInputError(f"ensemble '{ensemble.name}': member {ckpt.id} records no training data set; "
                                "a student needs the teacher's data set")
        found[(dataset["name"], dataset.get("fingerprint"))] = ckpt.id
    if len(found) > 1:
        sets = ", ".join(f"{name} ({member})" for (name, _), member in found.items())
        raise BadInputError(f"ensemble '{ensemble.name}': its members were trained on different data sets or "
                            f"versions of one ({sets}); a student learns from one data set")
    [(name, fingerprint)] = found
    return {"name": name, "fingerprint": fingerprint}


def open_teacher(name: str, root: Path | None = None, *, run: str | None = None) -> Ensemble:
    """The stored ensemble ``name``; for the resume of run ``run`` a missing one says which run needs it."""
    try:
        return read_ensemble(name, root)
    except NotFoundError as exc:
        if run is None:
            raise
        raise NotFoundError(f"run {run} distils ensemble '{name}', which is gone ({exc}); the run cannot "
                            f"be resumed: start a new one with dermcam distill") from None


def check_probabilities(probs: Any, n: int, k: int) -> str | None:
    """Why ``probs`` is not an (n, k) array of probabilities (finite, in [0, 1], rows summing to 1), or None."""
    if not isinstance(probs, np.ndarray) or probs.shape != (n, k):
        return f"shape {getattr(probs, 'shape', None)}, expected ({n}, {k})"
    if not np.isfinite(probs).all():
        return "it holds NaN or infinite values"
    if (probs < 0).any() or (probs > 1).any():
        return "it holds values outside [0, 1]"
    worst = float(np.abs(probs.astype(np.float64).sum(axis=1) - 1.0).max()) if n else 0.0
    if worst > SUM_TOLERANCE:
        return f"a row sums to {1 + worst:.4g} or {1 - worst:.4g}, not 1"
    return None


def write_soft_targets(path: Path, probs: np.ndarray, rows: np.ndarray, *, teacher: str, sha256: str,
                       fingerprint: str, classes: list[str], seconds: float | None = None) -> None:
    """Atomically write the soft targets (safetensors: no pickle) with what identifies them."""
    from safetensors.numpy import save_file

    from dermcam.store.files import atomic_path

    metadata = {"schema": SOFT_TARGETS_SCHEMA, "teacher": teacher, "sha256": sha256, "fingerprint": fingerprint,
                "classes": json.dumps(list(classes)), "seconds": f"{seconds or 0.0:.3f}"}
    tensors = {"probs": np.ascontiguousarray(probs, dtype=np.float32),
               "rows": np.ascontiguousarray(rows, dtype=np.int64)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_soft_targets(path: Path, *, sha256: str, fingerprint: str, rows: np.ndarray,
                      classes: list[str]) -> np.ndarray:
    """The stored soft targets, if they are for this teacher (sha256), data set (fingerprint), these train
    rows in this order and these classes, and are probabilities; CorruptError saying why otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            names = set(handle.keys())
            if names != {"probs", "rows"}:
                raise CorruptError(f"{path} cannot be used: it holds tensors {sorted(names)}, not probs and rows")
            probs, stored_rows = handle.get_tensor("probs"), handle.get_tensor("rows")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptError(f"{path} cannot be used: it is not a readable safetensors file ({first_line(exc)})") \
            from None
    problem = None
    if meta.get("schema") != SOFT_TARGETS_SCHEMA:
        problem = "it is not a soft-targets file"
    elif meta.get("sha256") != sha256:
        problem = "it was computed by another version of the teacher ensemble (manifest sha256 differs)"
    elif meta.get("fingerprint") != fingerprint:
        problem = "it was computed on another version of the data set (fingerprint differs)"
    elif meta.get("classes") != json.dumps(list(classes)):
        problem = "its classes differ"
    elif stored_rows.shape != rows.shape or not np.array_equal(stored_rows, rows):
        problem = "it is for other train rows"
    else:
        problem = check_probabilities(probs, len(rows), len(classes))
    if problem:
        raise CorruptError(f"{path} cannot be used: {problem}")
    return probs.astype(np.float32, copy=False)


def soft_targets_seconds(path: Path) -> float | None:
    """How long the teacher took to compute the stored soft targets (from their header), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return float((handle.metadata() or {})["seconds"])
    except Exception:  # noqa: BLE001 - informational only: a missing or odd header means "unknown"
        return None


def compute_soft_targets(name: str, data: Any, rows: np.ndarray, *, device: Any, precision: str,
                         batch_size: int = 64, root: Path | None = None,
                         progress: Progress | None = None) -> np.ndarray:
    """The teacher's calibrated probabilities (N, K) float32 for cache rows ``rows`` of prepared set
    ``data``: exactly what ``dermcam evaluate ensemble:NAME`` scores for those images (the same loader,
    predict, patient metadata for members that use it, and
    :func:`~dermcam.evaluate.operating.model_outputs`), rows renormalised after the cast to float32.

    The global RNG state is put back afterwards: building the members draws random initial weights,
    and a student must train the same whether its soft targets were computed or read back.
    """
    from dermcam.data.metadata import model_metadata
    from dermcam.evaluate.operating import model_outputs
    from dermcam.evaluate.predict import predict
    from dermcam.store.inference import load_for_inference
    from dermcam.train.rng import rng_state, set_rng_state

    saved = rng_state()
    try:
        model, sidecar = load_for_inference(PREFIX + name, root)
        model.to(device)
        raw = predict(model, data.images, rows, preprocessing=sidecar["preprocessing"], device=device,
                      precision=precision, batch_size=batch_size, progress=progress,
                      description=f"teacher {PREFIX}{name}",
                      metadata=model_metadata(sidecar, data.index.iloc[rows].reset_index(drop=True)))
        del model
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()
    finally:
        set_rng_state(saved)
    probs = np.asarray(model_outputs(raw, sidecar).probs, dtype=np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32)


@dataclass
class Teacher:
    """A run's teacher: which ensemble (and which version of it), the soft targets of the train rows
    (aligned with them), the distillation settings, and whether the targets still need writing."""

    name: str
    sha256: str
    targets: np.ndarray
    temperature: float
    alpha: float
    fingerprint: str
    classes: list[str]
    rows: np.ndarray
    members: int
    seconds: float | None = None
    pending: bool = True  # computed now: to be written to the run folder

    @property
    def id(self) -> str:
        return PREFIX + self.name

    def block(self) -> dict[str, Any]:
        """The ``distillation`` record of every sidecar of the run."""
        return {"teacher": self.id, "sha256": self.sha256, "temperature": float(self.temperature),
                "alpha": float(self.alpha)}

    def save(self, run_dir: Path) -> None:
        """Write the soft targets into the run folder (once: a resume reads them back)."""
        if not self.pending:
            return
        write_soft_targets(Path(run_dir) / SOFT_TARGETS_FILE, self.targets, self.rows, teacher=self.id,
                           sha256=self.sha256, fingerprint=self.fingerprint, classes=self.classes,
                           seconds=self.seconds)
        self.pending = False


def prepare_teacher(config: Any, data: Any, rows: np.ndarray, classes: list[str], *, run_dir: Path | None = None,
                    recorded: dict[str, Any] | None = None, device: Any, precision: str, batch_size: int = 64,
                    root: Path | None = None, progress: Progress | None = None) -> Teacher:
    """The teacher of a student run (``config.teacher``) with the soft targets of its train ``rows``.

    ``run_dir``: the run being resumed (None for a new run); its stored soft targets are used when they
    pass :func:`read_soft_targets`, else computed again with a note saying why. ``recorded``: the
    ``distillation`` block of the checkpoint it resumes from; a manifest that no longer has that sha256
    is an error, since the run would go on learning from another teacher.
    """
    progress = progress or Progress()
    name = teacher_name(config.teacher)
    run = Path(run_dir).name if run_dir is not None else None
    ensemble = open_teacher(name, root, run=run)
    sha = manifest_sha256(ensemble)
    if recorded and recorded.get("sha256") != sha:
        raise CorruptError(f"ensemble '{name}' changed since run {run} started (its manifest's sha256 is not the "
                           "one the run's checkpoints record); resuming would distil another teacher: start a new "
                           f"run with dermcam distill {name}")
    if list(ensemble.manifest["classes"]) != list(classes):
        raise BadInputError(f"ensemble '{name}' answers for classes {', '.join(ensemble.manifest['classes'])}, "
                            f"the student's data set '{data.name}' has {', '.join(classes)}")
    common = dict(name=name, sha256=sha, temperature=config.distill_temperature, alpha=config.distill_alpha,
                  fingerprint=data.fingerprint, classes=list(classes), rows=np.asarray(rows),
                  members=len(ensemble.manifest["members"]))
    path = Path(run_dir) / SOFT_TARGETS_FILE if run_dir is not None else None
    if path is not None:
        if path.is_file():
            try:
                targets = read_soft_targets(path, sha256=sha, fingerprint=data.fingerprint, rows=np.asarray(rows),
                                            classes=list(classes))
                progress.log(f"Soft targets of {PREFIX}{name}: read back from {path}")
                return Teacher(targets=targets, seconds=soft_targets_seconds(path), pending=False, **common)
            except CorruptError as exc:
                progress.log(f"Note: {exc}; computing them again")
        else:
            progress.log(f"Note: run {run} has no {SOFT_TARGETS_FILE}; computing the soft targets again")
    expected = teacher_dataset(ensemble, root)
    if expected["name"] != data.name or expected["fingerprint"] != data.fingerprint:
        why = (f"data set '{data.name}' changed since ensemble '{name}' was trained (fingerprints differ)"
               if expected["name"] == data.name else
               f"ensemble '{name}' was trained on data set '{expected['name']}', the student's is '{data.name}'")
        raise BadInputError(f"{why}: a student learns the teacher's answers on the teacher's own data")
    started = time.monotonic()
    targets = compute_soft_targets(name, data, np.asarray(rows), device=device, precision=precision,
                                   batch_size=batch_size, root=root, progress=progress)
    seconds = time.monotonic() - started
    problem = check_probabilities(targets, len(rows), len(classes))
    if problem:
        raise CorruptError(f"ensemble '{name}' gave soft targets that are not probabilities ({problem})")
    progress.log(f"Soft targets of {PREFIX}{name}: {len(rows)} train images x {common['members']} members "
                 f"in {seconds:.1f} s")
    return Teacher(targets=targets, seconds=seconds, pending=True, **common)

