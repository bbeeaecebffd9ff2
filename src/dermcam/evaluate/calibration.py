"""Calibrated probabilities: temperature scaling fitted on the validation split, and how to measure it.

dermcam trains with a class-weighted, label-smoothed loss. Both are good for the decision (melanoma
is not drowned by nevi) and bad for the numbers: class weights shift every probability towards the
rare classes and label smoothing caps confidence, so "p(mel) = 0.4" is not a 40% chance. Temperature
scaling (Guo et al., 2017) fixes the scale with one number fitted on validation images the model
never trained on: ``softmax(log p / T)``. It works on the probabilities themselves (``log p`` differs
from the logits by a constant per image, which softmax ignores), so a sidecar or an exported file can
carry it without the model, and it never changes which class has the highest probability.

Vector scaling on log-probabilities (a per-class scale and bias, the diagonal form of Dirichlet
calibration, Kull et al., 2019) can also correct the prior shift the class weights cause, but has
2K parameters instead of one, and can change the argmax: it then changes the model's decisions, not
only its numbers. So it is opt-in (``dermcam calibrate --vector``), and even then :func:`fit` keeps it
only when it predicts held-out validation lesions better than temperature scaling (a lesion-grouped
2-fold split; see :func:`vector_check`); training calibrates with a temperature alone.

:func:`apply` is the one place calibration is applied: ``evaluate``, ``explain``, ``calibrate``
and training all call it, so one image keeps one answer everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dermcam.errors import CorruptError
from dermcam.store.schema import BIAS_LIMIT, TEMPERATURE_RANGE

MEMBERS = "members"  # an ensemble's: each member's calibration is applied inside it, nothing after
BINS = 15  # ECE: equal-width bins of top-label confidence, as in Guo et al.
_FLOOR = 1e-30  # log(0) guard: a probability that underflowed in float32 stays (nearly) zero
_BIAS_PENALTY = 1e-3  # softmax ignores a shift of every bias; a little L2 picks the centred one


# -- measuring ------------------------------------------------------------------------------------


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    """ECE: the gap between confidence (top-label probability) and accuracy, averaged over ``bins``
    equal-width confidence bins weighted by how many images fall in each."""
    if not len(probs):
        return float("nan")
    table = reliability_bins(y_true, probs, bins)
    filled = table["count"] > 0
    gaps = table["count"][filled] * np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float(gaps.sum() / table["count"].sum())


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per confidence bin: image count, mean confidence and accuracy (NaN where empty): the reliability
    diagram's bars."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # bins are (lo, hi]
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count,
                "confidence": np.bincount(which, weights=confidence, minlength=bins) / count,
                "accuracy": np.bincount(which, weights=correct, minlength=bins) / count}


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the summed squared error against the one-hot label."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y_true, dtype=np.int64)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def calibration_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ECE (15 bins), Brier score and NLL, rounded for reports."""
    from dermcam.evaluate.metrics import cross_entropy

    return {"ece": round(expected_calibration_error(y_true, probs), 6),
            "brier": round(brier_score(y_true, probs), 6),
            "nll": round(cross_entropy(np.asarray(y_true), np.asarray(probs, dtype=np.float64)), 6)}


# -- applying -------------------------------------------------------------------------------------


def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _FLOOR, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rescale(probs: np.ndarray, calibration: Mapping[str, Any]) -> np.ndarray:
    """``softmax(log p / T)``, or ``softmax(scale * log p + bias)`` for vector scaling (float64)."""
    z = log_probs(probs)
    if calibration.get("method") == "vector":
        return _softmax(z * np.asarray(calibration["scale"]) + np.asarray(calibration["bias"]))
    return _softmax(z / float(calibration["temperature"]))


def apply(probs: np.ndarray, sidecar: Mapping[str, Any]) -> np.ndarray:
    """The calibrated probabilities of a checkpoint (or exported file) for its raw softmax ``probs``
    (N, K); ``probs`` unchanged (as float64) when it has no calibration.

    The one function that applies calibration: every command calls it (through
    :func:`dermcam.evaluate.operating.model_outputs`), so evaluate and explain agree on every image.
    """
    calibration = sidecar.get("calibration")
    probs = np.asarray(probs, dtype=np.float64)
    if not calibration or calibration.get("method") == MEMBERS:
        return probs
    for key in ("scale", "bias"):
        if calibration.get(key) is not None and len(calibration[key]) != probs.shape[1]:
            raise CorruptError(f"checkpoint {sidecar.get('id')}: its calibration has {len(calibration[key])} "
                               f"{key} values for {probs.shape[1]} classes (damaged or modified)")
    return rescale(probs, calibration)


def describe(calibration: Mapping[str, Any] | None) -> str:
    """``temperature 1.83`` / ``vector scaling (temperature 1.83)`` / ``none``."""
    if not calibration:
        return "none"
    if calibration.get("method") == MEMBERS:
        return "each member's own, before the mean"
    temperature = f"temperature {calibration['temperature']:.3g}"
    return f"vector scaling ({temperature})" if calibration["method"] == "vector" else temperature


# -- fitting --------------------------------------------------------------------------------------


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The T in :data:`TEMPERATURE_RANGE` that minimises the NLL of ``softmax(log p / T)``.

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), so a bounded
    scalar search finds the global minimum; a set the model separates perfectly ends at the bound.
    """
    from scipy.optimize import minimize_scalar

    z, y = log_probs(probs), np.asarray(y_true, dtype=np.int64)
    picked = z[np.arange(len(y)), y]

    def nll(beta: float) -> float:
        scaled = beta * z
        top = scaled.max(axis=1)
        return float((top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)) - beta * picked).mean())

    low, high = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-7})
    beta = min((best.x, low, high), key=nll)  # the search never evaluates the bounds themselves
    return float(np.clip(1 / beta, *TEMPERATURE_RANGE))


def fit_vector(y_true: np.ndarray, probs: np.ndarray, temperature: float) -> tuple[list[float], list[float]]:
    """Per-class scale and bias minimising the NLL of ``softmax(scale * log p + bias)`` (L-BFGS-B,
    starting from the temperature, scales within :data:`TEMPERATURE_RANGE`'s inverse)."""
    from scipy.optimize import minimize

    z, y = log_probs(probs), np.asarray(y_true, dtype=np.int64)
    n, k = z.shape
    onehot = np.eye(k)[y]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        scale, bias = params[:k], params[k:]
        q = _softmax(z * scale + bias)
        value = -np.log(np.clip(q[np.arange(n), y], _FLOOR, 1.0)).mean() + _BIAS_PENALTY * (bias ** 2).sum()
        residual = (q - onehot) / n
        grad = np.concatenate([(residual * z).sum(axis=0), residual.sum(axis=0) + 2 * _BIAS_PENALTY * bias])
        return float(value), grad

    bounds = [(1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0])] * k + [(-BIAS_LIMIT, BIAS_LIMIT)] * k
    start = np.concatenate([np.full(k, 1 / temperature), np.zeros(k)])
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return [float(v) for v in result.x[:k]], [float(v) for v in result.x[k:]]


def two_folds(groups: Sequence[str], seed: int = 0) -> np.ndarray:
    """Fold (0 or 1) of each image, whole lesions to one fold, lesions shuffled with ``seed``."""
    names, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of_group = np.empty(len(names), dtype=np.int64)
    fold_of_group[order] = np.arange(len(names)) % 2
    return fold_of_group[index]


MIN_LESIONS_PER_FOLD = 5  # below this a held-out NLL says nothing; temperature scaling is kept


def vector_check(y_true: np.ndarray, probs: np.ndarray, groups: Sequence[str]) -> dict[str, Any]:
    """Does vector scaling predict held-out lesions better than a temperature? Each half of the
    validation lesions is calibrated both ways on the other half; ``kept`` only when vector scaling's
    held-out NLL is lower on both halves (one lucky half is not a measurable improvement)."""
    y = np.asarray(y_true, dtype=np.int64)
    fold = two_folds(groups)
    lesions = [len(set(np.asarray(groups, dtype=object)[fold == f].astype(str))) for f in (0, 1)]
    if min(lesions) < MIN_LESIONS_PER_FOLD:
        return {"kept": False, "note": f"too few validation lesions ({sum(lesions)}) to compare on held-out "
                                       f"halves (needs {MIN_LESIONS_PER_FOLD} per half)"}
    held_out: dict[str, list[float]] = {"temperature_nll": [], "vector_nll": []}
    for f in (0, 1):
        fit_rows, test_rows = fold != f, fold == f
        temperature = fit_temperature(y[fit_rows], probs[fit_rows])
        scale, bias = fit_vector(y[fit_rows], probs[fit_rows], temperature)
        for key, calibration in (("temperature_nll", {"method": "temperature", "temperature": temperature}),
                                 ("vector_nll", {"method": "vector", "scale": scale, "bias": bias})):
            held_out[key].append(calibration_metrics(y[test_rows], rescale(probs[test_rows], calibration))["nll"])
    kept = all(v < t for v, t in zip(held_out["vector_nll"], held_out["temperature_nll"]))
    return {"kept": kept, "lesions": lesions, **held_out}


def fit(y_true: np.ndarray, probs: np.ndarray, groups: Sequence[str], *, vector: bool = False) -> dict[str, Any]:
    """A calibration for raw validation ``probs``: the sidecar's ``calibration`` entry without its
    ``fitted_on``/``created`` record. Temperature scaling; with ``vector`` also vector scaling, kept
    where :func:`vector_check` says it measurably helps; ``before``/``after`` are ECE, Brier and NLL
    on these images."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    temperature = fit_temperature(y, probs)
    calibration: dict[str, Any] = {"method": "temperature", "temperature": round(temperature, 6)}
    check = vector_check(y, probs, groups) if vector else None
    if check is not None and check["kept"]:
        scale, bias = fit_vector(y, probs, temperature)
        calibration.update(method="vector", scale=scale, bias=bias)
    return {**calibration, "before": calibration_metrics(y, probs),
            "after": calibration_metrics(y, rescale(probs, calibration)), "vector_check": check}
