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
    from dermcam.errors import BadInputError
    from dermcam.store.crossval import missing_folds, oof_path, read_cv, read_oof

    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 0 <= resamples <= 100_000:
        raise BadInputError("--resamples must be a whole number from 0 to 100000 (0: no intervals)")
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
