"""Operating points: "at 90% melanoma sensitivity, how many benign lesions go to biopsy?"

An operating point is a threshold on one class's *calibrated* probability, chosen on the validation
split to reach a target sensitivity or specificity (``mel:sensitivity=0.90``), stored with the
checkpoint, and then applied to every image: predict that class when its probability reaches the
threshold, else the most probable of the other classes. The argmax answers "which class is most
likely"; a screening service needs "flag every lesion that might be melanoma", which is this rule.

:func:`model_outputs` is the one path from raw softmax outputs to what every command shows:
calibrated probabilities (:func:`dermcam.evaluate.calibration.apply`) and decisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermcam.errors import BadInputError
from dermcam.evaluate import calibration

METRICS = ("sensitivity", "specificity")
_SPEC = re.compile(r"\s*([^:=\s]+)\s*:\s*([a-z]+)\s*=\s*([^\s]+)\s*")
SPEC_HELP = "CLASS:sensitivity=T or CLASS:specificity=T with 0 < T < 1, e.g. mel:sensitivity=0.90"


@dataclass(frozen=True)
class OperatingPointSpec:
    """What was asked for: reach ``target`` ``metric`` for class ``name`` on the validation split."""

    name: str
    metric: str
    target: float

    def __str__(self) -> str:
        return f"{self.name}:{self.metric}={self.target:g}"


def parse_operating_point(text: str) -> OperatingPointSpec:
    """``mel:sensitivity=0.90`` -> spec; anything else is a one-line :class:`BadInputError` (exit 2).
    Pure string work, so commands check it before loading a model or a data set."""
    match = _SPEC.fullmatch(str(text))
    target = _number(match.group(3)) if match else None
    if match is None or match.group(2) not in METRICS or target is None or not 0 < target < 1:
        raise BadInputError(f"--operating-point {text!r} is not {SPEC_HELP}")
    return OperatingPointSpec(match.group(1), match.group(2), target)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def spec_of(point: Mapping[str, Any]) -> OperatingPointSpec:
    """The spec a stored operating point was chosen for (to choose it again after a new calibration)."""
    return OperatingPointSpec(str(point["class"]), str(point["metric"]), float(point["target"]))


def class_index(spec: OperatingPointSpec, classes: Sequence[str]) -> int:
    """Index of the spec's class in ``classes``; an unknown class is a one-line error listing them."""
    if spec.name not in classes:
        raise BadInputError(f"--operating-point {spec}: no class '{spec.name}'; the classes are "
                            f"{', '.join(classes)}")
    return list(classes).index(spec.name)


def check_labels(spec: OperatingPointSpec, classes: Sequence[str], labels: np.ndarray, where: str) -> int:
    """The class exists and ``labels`` (of the split the threshold is chosen on) hold images of it and
    of other classes: sensitivity and specificity need both. Checked before training or predicting."""
    index = class_index(spec, classes)
    positives = int((np.asarray(labels) == index).sum())
    if positives == 0 or positives == len(labels):
        which = f"no image of class {spec.name}" if positives == 0 else f"only images of class {spec.name}"
        raise BadInputError(f"--operating-point {spec}: {where} has {which}, so no threshold can be chosen")
    return index


def choose(scores: np.ndarray, positive: np.ndarray, spec: OperatingPointSpec) -> dict[str, Any]:
    """The threshold on ``scores`` (calibrated p(class) of the validation images) for ``spec``.

    Candidate cut-offs are the observed scores (plus one above the highest); a lesion is called positive
    when its score is >= the threshold. Sensitivity falls as the threshold rises, so for a sensitivity
    target the *highest* cut-off that still reaches it is taken (fewest false alarms); specificity rises
    with the threshold, so for a specificity target the *lowest* (fewest misses).

    The stored threshold is the midpoint between the chosen cut-off and the next observed score below
    it, not the score itself: a threshold equal to a validation image's probability would let a
    difference in the last bits (another batch size, thread count or CPU) flip that image's decision
    between ``calibrate`` and ``evaluate``; the midpoint gives the same decisions with a margin.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    candidates = np.unique(scores)
    if candidates[-1] < 1.0:
        candidates = np.append(candidates, (candidates[-1] + 1.0) / 2)
    found_pos = len(pos) - np.searchsorted(pos, candidates, side="left")  # positives with score >= t
    below_neg = np.searchsorted(neg, candidates, side="left")  # negatives with score < t
    if spec.metric == "sensitivity":
        reached = np.flatnonzero(found_pos >= spec.target * len(pos) - 1e-9)
        pick = int(reached[-1])  # never empty: the lowest candidate finds every positive
    else:
        reached = np.flatnonzero(below_neg >= spec.target * len(neg) - 1e-9)
        pick = int(reached[0]) if len(reached) else len(candidates) - 1
    validation = {"sensitivity": round(float(found_pos[pick] / len(pos)), 6),
                  "specificity": round(float(below_neg[pick] / len(neg)), 6),
                  "n": len(scores), "positives": len(pos), "negatives": len(neg),
                  "reached": bool(len(reached))}
    below = candidates[pick - 1] if pick else 0.0
    threshold = (below + candidates[pick]) / 2
    if not below < threshold <= candidates[pick]:  # adjacent floats: no room for a margin
        threshold = candidates[pick]
    return {"class": spec.name, "metric": spec.metric, "target": spec.target,
            "threshold": float(min(threshold, 1.0)), "validation": validation}


def decide(probs: np.ndarray, point: Mapping[str, Any] | None, classes: Sequence[str]) -> np.ndarray:
    """Class index per image: with an operating point, its class when p(class) >= threshold, else the
    argmax of the other classes; without one, the argmax."""
    probs = np.asarray(probs)
    if point is None:
        return probs.argmax(axis=1)
    c = list(classes).index(point["class"])
    others = probs.astype(np.float64, copy=True)
    others[:, c] = -np.inf
    return np.where(probs[:, c] >= point["threshold"], c, others.argmax(axis=1))


def describe(point: Mapping[str, Any], probability: float) -> str:
    """``mel: above threshold 0.231`` (or below): what the rule made of this image's p(class)."""
    side = "above" if probability >= point["threshold"] else "below"
    return f"{point['class']}: {side} threshold {point['threshold']:.3f}"


@dataclass(frozen=True)
class ModelOutputs:
    """What a command shows for a batch of images: the probabilities (calibrated unless turned off or
    not fitted), the decision per image, and the calibration and operating point that were applied."""

    probs: np.ndarray
    decisions: np.ndarray
    classes: list[str]
    calibration: dict[str, Any] | None
    operating_point: dict[str, Any] | None

    def notes(self) -> list[str | None]:
        """Per image, ``mel: above threshold 0.231`` with an operating point, else None."""
        if self.operating_point is None:
            return [None] * len(self.probs)
        c = self.classes.index(self.operating_point["class"])
        return [describe(self.operating_point, float(p)) for p in self.probs[:, c]]


def model_outputs(raw: np.ndarray, sidecar: Mapping[str, Any], *, calibrated: bool = True) -> ModelOutputs:
    """Raw softmax outputs (N, K) -> calibrated probabilities and decisions, for every command.

    ``calibrated=False`` (``--no-calibration``) shows the model as it is: raw probabilities and argmax
    decisions. The operating point goes with the calibration, since its threshold is a calibrated
    probability: it has no meaning on the raw scale.
    """
    classes = list(sidecar["classes"])
    cal = sidecar.get("calibration") if calibrated else None
    probs = calibration.apply(raw, sidecar) if cal else np.asarray(raw, dtype=np.float64)
    point = sidecar.get("operating_point") if cal else None
    return ModelOutputs(probs, decide(probs, point, classes), classes, cal, point)


def applied(sidecar: Mapping[str, Any], *, calibrated: bool = True
            ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What an output file records as applied: the calibration (method, temperature) and the operating
    point (class, metric, target, threshold), by the rule of :func:`model_outputs` (the point goes with
    the calibration). The schema guarantees these keys wherever a calibration is stored."""
    cal = sidecar.get("calibration") if calibrated else None
    point = sidecar.get("operating_point") if cal else None
    return ({"method": cal["method"], "temperature": cal.get("temperature")} if cal else None,
            {k: point[k] for k in ("class", "metric", "target", "threshold")} if point else None)


def binary_rates(confusion: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of class ``c`` (one against the rest) from (R, K, K) confusion
    matrices (true, predicted); NaN where a resample has no positive or no negative."""
    tp = confusion[:, c, c]
    positives = confusion[:, c, :].sum(axis=1)
    negatives = confusion.sum(axis=(1, 2)) - positives
    true_negatives = negatives - (confusion[:, :, c].sum(axis=1) - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(positives > 0, tp / positives, np.nan),
                np.where(negatives > 0, true_negatives / negatives, np.nan))


def operating_metrics(y_true: np.ndarray, outputs: ModelOutputs, groups: Sequence[str], *,
                      resamples: int, seed: int) -> dict[str, Any]:
    """Sensitivity and specificity of the operating point's decisions on an evaluated set, with
    bootstrap intervals over lesions (the same resamples as the headline metrics), and the confusion
    matrix of the decisions."""
    from dermcam.evaluate.bootstrap import LEVEL, group_weights, percentile_intervals, weighted_confusion

    point = outputs.operating_point
    assert point is not None
    k, c = len(outputs.classes), outputs.classes.index(point["class"])
    y_true = np.asarray(y_true, dtype=np.int64)
    confusion = weighted_confusion(y_true, outputs.decisions, np.ones((1, len(y_true))), k)
    sensitivity, specificity = binary_rates(confusion, c)
    out: dict[str, Any] = {
        **point, "n": len(y_true), "positives": int((y_true == c).sum()),
        "sensitivity": _value(sensitivity[0]), "specificity": _value(specificity[0]),
        "confusion_matrix": confusion[0].astype(np.int64).tolist(),
    }
    if resamples:
        weights = group_weights(groups, resamples, seed)
        sens, spec = binary_rates(weighted_confusion(y_true, outputs.decisions, weights, k), c)
        out["ci"] = {"level": LEVEL, "resamples": resamples,
                     "intervals": percentile_intervals({"sensitivity": sens, "specificity": spec}, LEVEL)}
    return out


def _value(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)
