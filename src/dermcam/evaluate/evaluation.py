"""Evaluating a checkpoint on a split of a prepared data set: metrics and report files."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.data.overlap import OVERLAP_THRESHOLD
from dermcam.errors import BadInputError, NotFoundError
from dermcam.evaluate.bootstrap import DEFAULT_RESAMPLES
from dermcam.evaluate.predict import calibrated_outputs
from dermcam.models.device import resolve_precision
from dermcam.progress import Progress


@dataclass
class EvalResult:
    """What ``evaluate`` measured: metrics (with bootstrap intervals under ``metrics["ci"]``),
    per-subgroup metrics, which images of the set were left out, and the files written."""

    checkpoint_id: str
    dataset: str
    split: str
    metrics: dict[str, Any]
    classes: list[str]
    report_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trained_on: str | None = None
    scored_classes: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # images of classes the model does not know
    subgroups: list[dict[str, Any]] = field(default_factory=list)
    overlap: dict[str, Any] = field(default_factory=dict)  # OverlapCheck.to_dict(): images shared with training
    metadata: dict[str, Any] | None = None  # dermcam.data.metadata.summary: fields used, images without any

    @property
    def title(self) -> str:
        trained = f" (trained on {self.trained_on})" if self.trained_on and self.trained_on != self.dataset else ""
        return f"{self.checkpoint_id}{trained} on {self.dataset}/{self.split}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``dermcam evaluate --json`` prints)."""
        return {"checkpoint": self.checkpoint_id, "trained_on": self.trained_on, "dataset": self.dataset,
                "split": self.split, "classes": self.classes, "scored_classes": self.scored_classes,
                "left_out": self.left_out, "overlap": self.overlap, "metrics": self.metrics,
                "subgroups": self.subgroups, "metadata": self.metadata, "files": [str(p) for p in self.files],
                "warnings": self.warnings}


def match_classes(model_classes: list[str], data_classes: list[str],
                  dataset: str) -> tuple[np.ndarray, list[int]]:
    """Map the set's labels onto the model's class indices by name (case-insensitive).

    Returns ``mapping`` (set label -> model index, -1 for a class the model does not know) and the
    model indices that occur in the set; a set sharing no class with the model is an error.
    """
    position = {c.lower(): i for i, c in enumerate(model_classes)}
    mapping = np.array([position.get(c.lower(), -1) for c in data_classes], dtype=np.int64)
    shared = sorted({int(i) for i in mapping if i >= 0})
    if not shared:
        raise BadInputError(f"data set '{dataset}' ({', '.join(data_classes)}) shares no class with the model "
                            f"({', '.join(model_classes)})")
    return mapping, shared


@dataclass
class ScoredSplit:
    """The images of a split that a model can be scored on: cache rows, labels as the model's class
    indices, their index rows and lesion groups, and what was left out (and why)."""

    data: Any  # dermcam.data.dataset.PreparedDataset
    rows: np.ndarray
    y_true: np.ndarray
    index: Any  # pandas.DataFrame, one row per image in ``rows``
    groups: np.ndarray
    shared: list[int]
    left_out: dict[str, int]
    warnings: list[str]
    trained_on: str | None


def scored_split(sidecar: dict[str, Any], dataset: str | None, split: str, root: Path | None) -> ScoredSplit:
    """Open ``split`` of ``dataset`` (default: the set the checkpoint was trained on) for a checkpoint:
    classes matched by name, images of classes the model does not know counted and left out, and a
    warning when the training set changed since (its splits may then overlap the training data)."""
    from dermcam.data.dataset import load_prepared
    from dermcam.data.folds import fold_setting, split_rows
    from dermcam.data.split import group_keys

    trained_on = (sidecar.get("dataset") or {}).get("name")
    data = load_prepared(dataset or trained_on, root)
    mapping, shared = match_classes(list(sidecar["classes"]), list(data.classes), data.name)
    warnings = []
    fingerprint = (sidecar.get("dataset") or {}).get("fingerprint")
    if data.name == trained_on and fingerprint and fingerprint != data.fingerprint:
        warnings.append(f"data set '{data.name}' changed since checkpoint {sidecar['id']} was trained "
                        "(fingerprints differ): its splits may overlap the training data")
    # A cross-validation fold run's val is its held-out fold and its train the other folds (data/folds.py):
    # on its own set, calibration and --split val/train score what the run validated and trained on.
    setting = fold_setting(sidecar.get("config")) if data.name == trained_on else None
    rows, labels = split_rows(data, split, *setting) if setting else data.split(split)
    known = mapping[labels] >= 0
    left_out = {data.classes[k]: int(n) for k, n in enumerate(np.bincount(labels[~known], minlength=len(data.classes)))
                if n}
    if left_out:
        warnings.append("left out images of classes the model does not know: "
                        + ", ".join(f"{c} ({n})" for c, n in left_out.items()))
    rows, y_true = rows[known], mapping[labels[known]]
    if len(rows) == 0:
        raise BadInputError(f"split '{split}' of data set '{data.name}' has no image of the model's classes")
    index = data.index.iloc[rows].reset_index(drop=True)
    # Resample what the split kept together: the set's recorded group (lesion, else patient, else image).
    groups = (index["group"] if "group" in index.columns else group_keys(index)).to_numpy()
    return ScoredSplit(data, rows, y_true, index, groups, shared, left_out, warnings, trained_on)


def training_sets(sidecar: dict[str, Any], root: Path | None) -> list[str]:
    """The data sets the model learned from: the checkpoint's (its sidecar's ``dataset.name``); for an
    ensemble, every member's, since members may come from different sets (the ensemble's own record
    names only its first member's)."""
    names = [(sidecar.get("dataset") or {}).get("name")]
    if sidecar.get("kind") == "ensemble":
        from dermcam.store.references import resolve

        members = sidecar.get("members") or []
        names += [(resolve(m["id"], root).sidecar.get("dataset") or {}).get("name") for m in members]
    return list(dict.fromkeys(str(n) for n in names if n))


@dataclass
class OverlapCheck:
    """The evaluated images against the model's training set(s): ``overlap`` (all of them merged; None
    when nothing was compared), ``unchecked`` (set -> why it could not be compared), whether the
    overlapping images were ``kept`` (``--keep-overlap``), and ``reason`` when nothing was to check."""

    threshold: float
    training_set: str | None
    compared_with: list[str] = field(default_factory=list)
    overlaps: list[Any] = field(default_factory=list)  # dermcam.data.overlap.Overlap, one per set compared
    unchecked: dict[str, str] = field(default_factory=dict)
    kept: bool = False
    reason: str | None = None

    @property
    def overlap(self) -> Any:
        from dermcam.data.overlap import merged

        return merged(self.overlaps) if self.overlaps else None

    @property
    def checked(self) -> bool:
        """Every training set other than the evaluated one was compared (and there was one)."""
        return bool(self.compared_with) and not self.unchecked

    def to_dict(self) -> dict[str, Any]:
        from dermcam.data.overlap import OVERLAP_FILE

        found = self.overlap
        images = found.images if found else 0
        return {"checked": self.checked, "images": images, "excluded": 0 if self.kept else images,
                "threshold": self.threshold, "training_set": self.training_set, "compared_with": self.compared_with,
                "compared": found.compared if found else 0, "exact": found.exact if found else 0,
                "by_split": found.by_split if found else {}, "mostly": bool(found and found.mostly),
                "kept": self.kept, "file": OVERLAP_FILE if self.overlaps else None,
                "unchecked": self.unchecked, "reason": self.reason}


def exclude_overlap(scored: ScoredSplit, sidecar: dict[str, Any], *, threshold: float = OVERLAP_THRESHOLD,
                    keep: bool = False, root: Path | None = None) -> tuple[ScoredSplit, OverlapCheck]:
    """Compare the scored images with every set the model was trained on other than the evaluated one
    (:func:`dermcam.data.overlap.find_overlap`: byte-identical copies and fingerprints within
    ``threshold``), and leave the overlapping ones out of the split unless ``keep``.

    Every split of the training set counts: train taught the weights, val chose the epoch and the
    calibration, and test images are not new either. Evaluated on the training set itself there is
    nothing to do (its split keeps near-duplicates on one side). A training set missing from this store
    is a warning (the check cannot run; evaluation goes on); one without fingerprints, or damaged, an
    error naming the ``dermcam prepare`` command that fixes it. A split that overlaps entirely, with
    nothing left to score, is an error too.
    """
    from dermcam.data.dataset import load_prepared
    from dermcam.data.overlap import MOSTLY, find_overlap
    from dermcam.store.paths import datasets_dir

    data = scored.data
    names = training_sets(sidecar, root)
    check = OverlapCheck(threshold, (sidecar.get("dataset") or {}).get("name"), kept=keep)
    others = [n for n in names if n != data.name]
    if not others:
        check.reason = ("the model's training set is not recorded" if not names else
                        f"evaluated on its training set '{data.name}': its split keeps copies on one side")
        return scored, check
    warnings = list(scored.warnings)
    for name in others:
        try:
            training = load_prepared(name, root)
        except NotFoundError:
            check.unchecked[name] = f"not in this store ({datasets_dir(root)})"
            warnings.append(f"overlap with training set '{name}' not checked: it is not in this store "
                            f"({datasets_dir(root)}); images the model was trained on may be scored as new")
            continue
        check.overlaps.append(find_overlap(data, training, threshold, rows=scored.rows))
        check.compared_with.append(name)
    found = check.overlap
    if found is None or not found.images:
        return replace(scored, warnings=warnings), check
    where = f"{data.name}/{scored.index['split'].iloc[0]}"  # scored_split never returns an empty split
    left = found.compared - found.images
    if found.mostly:
        sets = " and ".join(f"'{n}'" for n in check.compared_with)
        warnings.append(f"{found.images} of {found.compared} images of {where} ({found.images / found.compared:.0%}, "
                        f"more than {MOSTLY:.0%}) are copies of images of training set {sets}: "
                        "as external validation this set mostly measures images the model was trained on"
                        + (" (kept: --keep-overlap)" if keep else f"; {left} images are left to score"))
    if keep:
        return replace(scored, warnings=warnings), check
    if left == 0:
        raise BadInputError(f"all {found.compared} images of {where} are in the model's training set "
                            f"({', '.join(check.compared_with)}): nothing left to score; --keep-overlap scores "
                            "them anyway (the result then measures training images)")
    keep_rows = ~np.isin(scored.rows, found.overlapping_rows())
    return replace(scored, rows=scored.rows[keep_rows], y_true=scored.y_true[keep_rows],
                   index=scored.index[keep_rows].reset_index(drop=True), groups=scored.groups[keep_rows],
                   warnings=warnings), check


def calibration_report(y_true: np.ndarray, raw: np.ndarray, outputs: Any) -> dict[str, Any]:
    """``metrics["calibration"]``: ECE, Brier and NLL of the probabilities reported (calibrated when a
    calibration was applied), the same of the raw ones under ``raw``, and what was applied. For an
    ensemble, raw is the weighted mean of its members' raw probabilities."""
    from dermcam.evaluate.calibration import calibration_metrics

    applied = outputs.calibration
    return {"applied": applied is not None, "method": applied["method"] if applied else None,
            "temperature": applied["temperature"] if applied else None,
            **calibration_metrics(y_true, outputs.probs), "raw": calibration_metrics(y_true, raw)}


def evaluate(ref: str | Path | None = None, *, split: str = "test", dataset: str | None = None,
             tta: bool = False, device: str = "auto", precision: str = "auto", batch_size: int = 64,
             resamples: int = DEFAULT_RESAMPLES, seed: int = 0, calibrated: bool = True, compile: bool = False,
             keep_overlap: bool = False, overlap_threshold: float = OVERLAP_THRESHOLD,
             out_dir: Path | None = None, root: Path | None = None, threads: int | str | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split of its data set, or of any prepared ``dataset`` (external
    validation): classes are matched by name, images of classes the model does not know are left out
    and counted, every headline metric gets a bootstrap interval over ``resamples`` lesion resamples
    (0: none), and subgroups get their own metrics. With ``out_dir``: metrics.json,
    confusion_matrix.png, reliability.png, roc.png, pr.png and predictions.csv; report.html is built from
    them by :func:`dermcam.report.build.write_html_report` (above ``explain``, whose Grad-CAMs it shows),
    which training and ``dermcam evaluate --out`` call.

    ``compile``: torch.compile for the forward passes (on this project's 2-core CPU 1.65x faster after a
    15 s compile: worth it for large sets); a failure falls back to eager with a warning.

    Probabilities are calibrated when the checkpoint has a calibration (``calibrated=False``: raw);
    ``metrics["calibration"]`` compares them with the raw ones. With an operating point,
    ``metrics["operating_point"]`` scores its decisions (the headline metrics stay argmax).

    On a set other than the model's training set, images that are copies of training images (the same
    bytes, or fingerprints within ``overlap_threshold``) are left out of every metric and listed in
    overlap.csv (:func:`exclude_overlap`); ``keep_overlap`` scores them too. ``EvalResult.overlap``
    counts them.

    ``threads``: torch CPU threads (:func:`dermcam.models.device.resolve_threads`; auto: the idle cores;
    the CLI's default). None keeps torch's count: a caller inside a training process (the end of
    ``train``, a cross-validation, a distillation) must not change the count its later runs train with.
    """
    from dermcam.data.metadata import model_metadata
    from dermcam.data.metadata import summary as metadata_summary
    from dermcam.evaluate.bootstrap import confidence_intervals
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.evaluate.operating import operating_metrics
    from dermcam.evaluate.report import write_predictions, write_probability_plots, write_report
    from dermcam.evaluate.subgroups import subgroup_metrics
    from dermcam.models.device import apply_threads, select_device
    from dermcam.store.inference import load_for_inference

    if split not in ("train", "val", "test"):
        raise BadInputError(f"--split must be train, val or test, not '{split}'")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 0 <= resamples <= 100_000:
        raise BadInputError("--resamples must be a whole number from 0 to 100000 (0: no intervals)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError("--batch-size must be a whole number of 1 or more")
    if threads is not None:
        apply_threads(threads)  # checked before any work, set before the model's first torch op
    from dermcam.data.overlap import OVERLAP_FILE, check_overlap_threshold, write_overlap

    overlap_threshold = check_overlap_threshold(overlap_threshold, "--overlap-threshold")
    notes: list[str] = []  # damaged checkpoints 'best' passed over; a --compile that fell back to eager
    model, sidecar = load_for_inference(ref, root, calibrated=calibrated, notes=notes)
    skipped = len(notes)  # shown first: they say which checkpoint answers
    classes = list(sidecar["classes"])
    scored_set, overlap = exclude_overlap(scored_split(sidecar, dataset, split, root), sidecar,
                                          threshold=overlap_threshold, keep=keep_overlap, root=root)
    data, y_true, groups = scored_set.data, scored_set.y_true, scored_set.groups
    dev = select_device(device)
    model.to(dev)
    # A metadata model reads the set's own age, sex and site columns, encoded as it was trained (an
    # unknown value, or a site it never saw, is its "unknown"); a model without metadata ignores them.
    outputs, raw = calibrated_outputs(model, sidecar, data.images, scored_set.rows, calibrated=calibrated, device=dev,
                                      precision=resolve_precision(precision, dev, scoring=True),
                                      batch_size=batch_size, tta=tta, compile=compile, notes=notes,
                                      progress=progress, description=f"evaluate {split}",
                                      metadata=model_metadata(sidecar, scored_set.index))
    probs = outputs.probs
    scored = scored_set.shared if len(scored_set.shared) < len(classes) else None
    metrics = compute_metrics(y_true, probs, classes, scored=scored)
    metrics["tta"] = tta
    if resamples:
        metrics["ci"] = confidence_intervals(y_true, probs, groups, classes, scored=scored, resamples=resamples,
                                             seed=seed).to_dict()
    metrics["calibration"] = calibration_report(y_true, raw, outputs)
    if outputs.operating_point is not None:
        metrics["operating_point"] = operating_metrics(y_true, outputs, groups, resamples=resamples, seed=seed)
    subgroups = subgroup_metrics(y_true, probs, scored_set.index, groups, classes, scored=scored,
                                 resamples=resamples, seed=seed)
    result = EvalResult(sidecar["id"], data.name, split, metrics, classes, out_dir, [],
                        notes[:skipped] + scored_set.warnings + notes[skipped:],
                        scored_set.trained_on, [classes[i] for i in scored_set.shared], scored_set.left_out,
                        subgroups, overlap.to_dict(), metadata_summary(sidecar, scored_set.index))
    if out_dir is not None:
        # which checkpoint and classes: what report.html reads back to describe and to regenerate it
        report = {**metrics, "checkpoint": result.checkpoint_id, "trained_on": scored_set.trained_on,
                  "dataset": data.name, "split": split, "scored_classes": result.scored_classes,
                  "left_out": scored_set.left_out, "overlap": result.overlap, "subgroups": subgroups,
                  "metadata": result.metadata}
        result.files = write_report(out_dir, report, classes, title=result.title)
        result.files += write_probability_plots(out_dir, y_true, raw, outputs, title=result.title)
        result.files.append(write_predictions(out_dir / "predictions.csv", scored_set.index, probs, classes,
                                              outputs.decisions if outputs.operating_point else None))
        if overlap.overlaps:  # beside predictions.csv: the images left out of it (or kept in it)
            result.files.append(write_overlap(out_dir / OVERLAP_FILE, overlap.overlaps))
        else:  # not this evaluation's: an earlier one's in the same folder would mislead
            (out_dir / OVERLAP_FILE).unlink(missing_ok=True)
    if sidecar.get("tracking"):  # a tracked run's checkpoint: the result goes to that run too (dermcam.track)
        from dermcam.track.base import numbers
        from dermcam.track.hooks import log_result

        log_result(sidecar, f"evaluate/{data.name}/{split}", numbers(metrics), files=result.files, root=root,
                   progress=progress)
    return result
