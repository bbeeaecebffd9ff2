"""The out-of-fold estimate of a cross-validation: what ``dermcam evaluate cv:NAME`` reports.

Every train+val image is predicted once, by the fold run that never trained on it (its held-out fold
chose that run's best epoch and fitted its calibration, the usual small optimism of early stopping
inside cross-validation; no test image is ever read). Pooled, these predictions give one estimate
over all train+val images, several times the images of the val split alone, with percentile
intervals from resampling groups (lesions, patients, near-duplicate clusters:
:mod:`dermcam.evaluate.bootstrap`), as ``evaluate`` reports for a split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.evaluate.bootstrap import DEFAULT_RESAMPLES
from dermcam.progress import Progress
from dermcam.store.checkpoint import Checkpoint
from dermcam.store.crossval import CrossValidation, OutOfFold


@dataclass
class CVEstimate:
    """The out-of-fold metrics of a cross-validation (with intervals under ``metrics["ci"]``)."""

    name: str
    dataset: str
    folds: int
    seed: int
    classes: list[str]
    metrics: dict[str, Any]
    images: int  # images predicted out of fold
    groups: int  # their groups (what the bootstrap resampled)
    expected_images: int | None  # train+val images of the set when the cross-validation started
    status: str
    fold_runs: list[dict[str, Any]]
    ensemble: str | None
    oof_file: Path | None
    warnings: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"cv:{self.name}: {self.folds}-fold cross-validation on {self.dataset} (train+val, out of fold)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``dermcam evaluate cv:NAME --json`` prints)."""
        return {"cv": self.name, "id": f"cv:{self.name}", "dataset": self.dataset, "split": "train+val (out of fold)",
                "folds": self.folds, "seed": self.seed, "classes": self.classes, "status": self.status,
                "images": self.images, "groups": self.groups, "expected_images": self.expected_images,
                "metrics": self.metrics, "fold_runs": self.fold_runs,
                "ensemble": f"ensemble:{self.ensemble}" if self.ensemble else None,
                "oof_file": str(self.oof_file) if self.oof_file else None, "warnings": self.warnings}


def oof_metrics(oof: OutOfFold, classes: list[str], *, resamples: int = DEFAULT_RESAMPLES,
                seed: int = 0) -> dict[str, Any]:
    """:func:`dermcam.evaluate.metrics.compute_metrics` of the pooled predictions, with group-bootstrap
    95% intervals under ``ci`` (``resamples`` 0: none) and the number of groups under ``groups``."""
    from dermcam.evaluate.bootstrap import confidence_intervals
    from dermcam.evaluate.metrics import compute_metrics

    metrics = compute_metrics(oof.label, oof.probs, classes)
    metrics["groups"] = len(set(map(str, oof.group)))
    if resamples:
        metrics["ci"] = confidence_intervals(oof.label, oof.probs, oof.group, classes, resamples=resamples,
                                             seed=seed).to_dict()
    return metrics


def cv_estimate(name: str, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                root: Path | None = None) -> CVEstimate:
    """The out-of-fold estimate of cross-validation ``name``, measured again from its stored predictions
    (``resamples`` and ``seed``: the bootstrap's). Reads the record and ``oof.csv`` only: no model, no
    data set, never the test split. An unfinished cross-validation is scored on the folds it has, with
    a warning saying how many."""
    from dermcam.store.crossval import missing_folds, oof_path, read_cv, read_oof

    _check_resamples(resamples)
    cv = read_cv(name, root)
    oof = read_oof(cv)
    record = cv.record
    classes = list(record["classes"])
    warnings = []
    done = [r["fold"] for r in record["fold_runs"] if r["status"] == "finished"]
    if len(done) < record["folds"]:
        warnings.append(f"cross-validation '{name}' is unfinished: {len(done)} of {record['folds']} folds scored "
                        f"({len(oof)} images), missing {missing_folds(cv)}; continue it with: "
                        f"dermcam train --resume --run cv:{name}")
    metrics = oof_metrics(oof, classes, resamples=resamples, seed=seed)
    return CVEstimate(name, record["dataset"]["name"], record["folds"], record["seed"], classes, metrics, len(oof),
                      metrics["groups"], record.get("images"), record["status"], record["fold_runs"],
                      record.get("ensemble"), oof_path(cv), warnings)


def _check_resamples(resamples: object) -> None:
    from dermcam.errors import BadInputError

    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 0 <= resamples <= 100_000:
        raise BadInputError("--resamples must be a whole number from 0 to 100000 (0: no intervals)")


@dataclass
class CVComparison:
    """Two cross-validations' out-of-fold predictions of the same images, metric by metric, with the
    paired interval of each difference (``cv`` minus ``against``)."""

    name: str  # the cross-validation compared
    against: str  # the one it is compared with
    dataset: str
    classes: list[str]
    images: int  # images both predicted out of fold
    groups: int
    rows: list[dict[str, Any]]  # metric, against, cv, difference, ci, verdict
    resamples: int
    seed: int
    warnings: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return (f"cv:{self.name} against cv:{self.against}: out-of-fold predictions of the same {self.images} "
                f"{self.dataset} images ({self.groups} groups), paired")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``dermcam evaluate cv:NAME --against cv:OTHER --json`` prints)."""
        return {"cv": f"cv:{self.name}", "against": f"cv:{self.against}", "dataset": self.dataset,
                "split": "train+val (out of fold)", "classes": self.classes, "images": self.images,
                "groups": self.groups, "resamples": self.resamples, "seed": self.seed, "metrics": self.rows,
                "warnings": self.warnings}


def compare_cv(name: str, against: str, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
               root: Path | None = None) -> CVComparison:
    """Is cross-validation ``name`` better than ``against``? Asked of their out-of-fold predictions.

    Why this, and not two test-split readings: choosing between recipes on the test split spends it,
    while both cross-validations predicted every train+val image once, as an image their models never
    trained on, and several times the images of any one split. Why paired: both are measured on the
    same resampled lesion groups (:func:`dermcam.evaluate.bootstrap.paired_intervals`), which cancels
    the noise they share, so a difference whose interval excludes 0 is one this data supports. The two
    may differ in anything (options, folds, seed); they must be of the same data set (name and
    fingerprint) and classes. Images only one of them predicted (an unfinished cross-validation) are
    left out, with a warning. Reads the two records and prediction files only: no model, no test image.
    """
    from dermcam.errors import BadInputError, CorruptError
    from dermcam.evaluate.bootstrap import paired_intervals
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.store.crossval import read_cv, read_oof

    _check_resamples(resamples)
    if name == against:
        raise BadInputError(f"--against names cv:{name} itself; compare it with another cross-validation")
    cv_a, cv_b = read_cv(against, root), read_cv(name, root)
    data_a, data_b = cv_a.record["dataset"], cv_b.record["dataset"]
    if data_a != data_b:
        raise BadInputError(f"cv:{name} ({data_b['name']}, fingerprint {data_b['fingerprint'][:12]}) and "
                            f"cv:{against} ({data_a['name']}, fingerprint {data_a['fingerprint'][:12]}) are not "
                            "of the same data set: their out-of-fold predictions are of different images")
    classes = list(cv_b.record["classes"])
    if list(cv_a.record["classes"]) != classes:
        raise BadInputError(f"cv:{name} predicts {', '.join(classes)} and cv:{against} "
                            f"{', '.join(cv_a.record['classes'])}: the classes differ")
    oof_a, oof_b = read_oof(cv_a), read_oof(cv_b)
    at_a = {image: i for i, image in enumerate(oof_a.image_id)}
    ib = np.array([i for i, image in enumerate(oof_b.image_id) if image in at_a], dtype=np.int64)
    if not len(ib):
        raise BadInputError(f"cv:{name} and cv:{against} predicted no image in common yet")
    common = [oof_b.image_id[i] for i in ib]
    ia = np.array([at_a[image] for image in common], dtype=np.int64)
    label, group = oof_b.label[ib], oof_b.group[ib]
    for what, x, y in (("label", oof_a.label[ia], label), ("group", oof_a.group[ia], group)):
        differs = np.flatnonzero(np.asarray(x).astype(str) != np.asarray(y).astype(str))
        if len(differs):
            raise CorruptError(f"image {common[differs[0]]} has another {what} in cv:{against}'s out-of-fold "
                               f"predictions than in cv:{name}'s, on the same data set (damaged or modified)")
    warnings = [f"cv:{n} predicted {len(o) - len(common)} images the other did not (unfinished?); they are left "
                f"out of the comparison" for n, o in ((name, oof_b), (against, oof_a)) if len(o) > len(common)]
    probs_a, probs_b = oof_a.probs[ia], oof_b.probs[ib]
    metrics_a, metrics_b = compute_metrics(label, probs_a, classes), compute_metrics(label, probs_b, classes)
    intervals = (paired_intervals(label, probs_a, probs_b, group, classes, resamples=resamples, seed=seed).ci
                 if resamples else {})
    rows = []
    for key in ("balanced_accuracy", "macro_f1", "auc_macro", *(f"{kind}_{c}" for c in classes
                                                                    for kind in ("recall", "auc"))):
        a, b = metrics_a.get(key), metrics_b.get(key)
        ci = intervals.get(key)
        rows.append({"metric": key, "against": a, "cv": b,
                     "difference": None if a is None or b is None else b - a, "ci": ci,
                     "verdict": _verdict(ci, name, against)})
    return CVComparison(name, against, data_b["name"], classes, len(common), len(set(map(str, group))), rows,
                        resamples, seed, warnings)


def _verdict(ci: list[float] | None, name: str, against: str) -> str | None:
    """What a paired interval of ``name`` minus ``against`` supports (None without an interval)."""
    if ci is None:
        return None
    if ci[0] > 0:
        return f"cv:{name} higher"
    if ci[1] < 0:
        return f"cv:{against} higher"
    return "no clear difference"


def fold_predictions(cv: CrossValidation, fold: int, ckpt: Checkpoint, *, device: str = "auto",
                     batch_size: int = 64, root: Path | None = None, progress: Progress | None = None) -> OutOfFold:
    """The fold run's best checkpoint, calibrated, on its held-out fold: that fold's out-of-fold predictions.

    The rows are the checkpoint's own val (its configuration's fold: :mod:`dermcam.data.folds`), found
    and predicted as calibration and ensembles find and predict a split.
    """
    from dermcam.errors import CorruptError
    from dermcam.evaluate.ensemble import member_probabilities
    from dermcam.evaluate.evaluation import scored_split

    config = ckpt.sidecar.get("config") or {}
    if config.get("folds") != cv.record["folds"] or config.get("fold") != fold:
        raise CorruptError(f"checkpoint {ckpt.id} is not fold {fold} of {cv.record['folds']} "
                           f"(cross-validation '{cv.name}' names it; damaged or modified)")
    split = scored_split(ckpt.sidecar, None, "val", root)
    (probs,) = member_probabilities([ckpt], split, device=device, batch_size=batch_size, progress=progress)
    n = len(split.rows)
    return OutOfFold(list(map(str, split.index["image_id"])), np.asarray(split.rows, dtype=np.int64),
                     np.full(n, fold, dtype=np.int64), [ckpt.run_id] * n, [ckpt.id] * n,
                     np.asarray(split.groups, dtype=object), np.asarray(split.y_true, dtype=np.int64),
                     np.asarray(probs, dtype=np.float64))
