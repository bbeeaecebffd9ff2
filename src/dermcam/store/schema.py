"""One small validator for every JSON document the store reads back, and the vocabulary they share.

Sidecars, ``run.json``, ``metrics.jsonl`` lines and export metadata are read from disk (or from a file
that came from another machine), so they are checked when read, not trusted because dermcam wrote
them once: a damaged document must become one ``CorruptError`` line naming the bad field, never a
``KeyError`` or ``TypeError`` three calls later, and never a NaN that flows into a prediction.

A schema is a *check*: a function ``(value, field) -> None`` that raises :class:`Invalid`. The
builders below (:func:`obj`, :func:`array`, :func:`integer`, ...) compose checks; each document's
schema lives next to the code that owns the document (``checkpoint.SIDECAR``, ``runs.RUN``, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from dermcam.color import COLOR_CONSTANCY_METHODS
from dermcam.errors import CorruptError
from dermcam.store.paths import PLAIN_NAME

Check = Callable[[Any, str], None]


class Invalid(Exception):
    """A value that breaks its schema: the dotted field and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"field '{field}' {why}" if field else why)


def validate(value: Any, check: Check, where: str) -> None:
    """Run ``check`` on a whole document; a violation becomes one CorruptError line (exit code 4)."""
    try:
        check(value, "")
    except Invalid as exc:
        raise CorruptError(f"{where} {exc} (damaged or modified)") from None


def _child(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- builders --------------------------------------------------------------------------------------


def anything(value: Any, field: str) -> None:
    """Any JSON value (the field is informational only)."""


def satisfies(predicate: Callable[[Any], bool], why: str) -> Check:
    def check(value: Any, field: str) -> None:
        if not predicate(value):
            raise Invalid(field, why)

    return check


def integer(lo: int = 0, hi: int = 2**53) -> Check:
    """An int (not a bool) in ``[lo, hi]``; JSON floats such as 3.0 are refused."""
    return satisfies(lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                     f"is not a whole number from {lo} to {hi}")


def number(*, above: float | None = None, finite: bool = True) -> Check:
    """A number; by default finite (JSON allows NaN and Infinity through Python's parser)."""
    def ok(v: Any) -> bool:
        return (_is_number(v) and (not finite or math.isfinite(v))
                and (above is None or v > above))

    why = "is not a finite number" if finite else "is not a number"
    return satisfies(ok, why + (f" above {above:g}" if above is not None else ""))


def text(pattern: re.Pattern[str] | None = None, *, min_len: int = 0, max_len: int = 10_000,
         why: str | None = None) -> Check:
    return satisfies(lambda v: isinstance(v, str) and min_len <= len(v) <= max_len
                     and (pattern is None or pattern.fullmatch(v) is not None),
                     why or f"is not a string of {min_len} to {max_len} characters")


def one_of(*values: Any) -> Check:
    return satisfies(lambda v: any(v == x and type(v) is type(x) for x in values),
                     f"is not one of {', '.join(map(repr, values))}")


boolean: Check = satisfies(lambda v: isinstance(v, bool), "is not true or false")


def nullable(check: Check) -> Check:
    def inner(value: Any, field: str) -> None:
        if value is not None:
            check(value, field)

    return inner


def array(item: Check, *, min_len: int = 0, max_len: int = 100_000, unique: bool = False) -> Check:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise Invalid(field, f"is not a list of {min_len} to {max_len} items")
        for i, entry in enumerate(value):
            item(entry, _child(field, i))
        if unique and len(set(value)) != len(value):
            raise Invalid(field, "has repeated items")

    return check


def fixed(*items: Check) -> Check:
    """A list of exactly ``len(items)`` entries, each with its own check (``[3, H, W]``)."""
    def check(value: Any, field: str) -> None:
        if not isinstance(value, list) or len(value) != len(items):
            raise Invalid(field, f"is not a list of {len(items)} items")
        for i, (entry, item) in enumerate(zip(value, items)):
            item(entry, _child(field, i))

    return check


def obj(required: Mapping[str, Check] | None = None, optional: Mapping[str, Check] | None = None) -> Check:
    """A JSON object with ``required`` keys and, when present, ``optional`` ones; other keys are
    allowed (newer dermcam versions may add fields), checked in the order given."""
    def check(value: Any, field: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(field, "is not a JSON object")
        for key, sub in (required or {}).items():
            if key not in value:
                raise Invalid(_child(field, key), "is missing")
            sub(value[key], _child(field, key))
        for key, sub in (optional or {}).items():
            if key in value:
                sub(value[key], _child(field, key))

    return check


def all_of(*checks: Check) -> Check:
    """Every one of ``checks``, in order (an object's fields first, then how they fit together)."""
    def check(value: Any, field: str) -> None:
        for item in checks:
            item(value, field)

    return check


def decoded(decode: Callable[[Any], Any], check: Check, why: str) -> Check:
    """``check`` applied to ``decode(value)``; a value that does not decode is invalid (``why``)."""
    def inner(value: Any, field: str) -> None:
        try:
            result = decode(value)
        except CorruptError:
            raise Invalid(field, why) from None
        check(result, field)

    return inner


# -- the vocabulary the store's documents share ----------------------------------------------------

NAME = text(PLAIN_NAME, why="is not a plain name (a name, never a path)")
SHA256 = text(re.compile(r"[0-9a-f]{64}"), why="is not a sha256 (64 hex digits)")
EPOCH = integer(0, 999_999)
TIMESTAMP = text(max_len=64)
ID = text(min_len=1, max_len=200)
# A stored checkpoint's id, RUN:EPOCH: what a document may use to name another checkpoint (an ensemble's
# member, a run's resume point). Never a path, so no document can lead a command outside the store.
CHECKPOINT_ID_PATTERN = re.compile(PLAIN_NAME.pattern + r":[0-9]{1,6}")
CHECKPOINT_ID = text(CHECKPOINT_ID_PATTERN, why="is not a checkpoint id (RUN:EPOCH)")
BACKBONE = text(re.compile(r"[A-Za-z0-9_.\-]{1,100}"), why="is not a model name")
# What dermcam.data.classes.is_plain_name accepts (the store may not import data, which imports it):
# every class a prepared set can have. Class names become file names, CSV columns and table headers,
# so one that is not such a name (a path, a newline, a blank) is damage, not a class.
CLASS_NAME_PATTERN = re.compile(r"[\w+-]{1,40}")
CLASS_NAME = text(CLASS_NAME_PATTERN, why="is not a class name (1-40 letters, digits, _ + -)")
CLASSES = array(CLASS_NAME, min_len=2, max_len=1000, unique=True)
LABEL_ENCODING = satisfies(lambda v: isinstance(v, (dict, list, str, type(None))),
                           "is not a JSON object, list or string")

_SIDE = integer(8, 4096)
_TRIPLE = fixed(number(), number(), number())

# What inference needs to see an image the way training saw it; shared by sidecars and exports so a
# NaN mean or a zero std can enter the store by neither door.
PREPROCESSING = obj({
    "input_size": fixed(one_of(3), _SIDE, _SIDE),
    "mean": _TRIPLE,
    "std": fixed(number(above=1e-6), number(above=1e-6), number(above=1e-6)),
}, optional={"interpolation": text(max_len=32), "resize": text(max_len=1000),
             "cache_size": nullable(fixed(_SIDE, _SIDE)),
             # changes every pixel the model sees: a value no dermcam applies is damage, not a no-op
             "color_constancy": one_of(*COLOR_CONSTANCY_METHODS)})

MONITOR = obj(optional={"name": text(max_len=100), "mode": one_of("min", "max"), "value": nullable(number())})


def METADATA(value: Any, field: str) -> None:  # noqa: N802 - a schema constant, like its neighbours
    """A model's patient-metadata encoding (:func:`dermcam.metadata_spec.spec_problem`): it shapes the
    network and every encoded row, so a damaged one is damage, not a detail."""
    from dermcam.metadata_spec import spec_problem

    problem = spec_problem(value)
    if problem is not None:
        raise Invalid(field, f"is not a usable metadata encoding: {problem}")

DATASET = obj(optional={"name": NAME, "fingerprint": text(max_len=200)})

# Where a run is tracked (dermcam.track): run.json and every sidecar it writes name each tracker, so a
# resume reopens the same MLflow run and evaluate logs to it. A URI is stored masked (no password); a
# TensorBoard folder is absolute, or a plain name inside the run folder (never a path leading out of it).
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]{1,4096}")
_TRACKED_ID = text(re.compile(r"[A-Za-z0-9_.\-]{1,128}"), why="is not a tracking id (letters, digits, _ . -)")


def _tracking_dir(value: Any, field: str) -> None:
    if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
        raise Invalid(field, "is not a folder name (1-4096 printable characters)")
    if not value.startswith("/") and not PLAIN_NAME.fullmatch(value):
        raise Invalid(field, "is neither an absolute folder nor a plain name inside the run folder")


TRACKER = obj({"kind": one_of("tensorboard", "mlflow")}, optional={
    "uri": nullable(text(_PRINTABLE, why="is not a URI (1-4096 printable characters)")),
    "dir": nullable(_tracking_dir),
    "run_id": nullable(_TRACKED_ID), "experiment_id": nullable(_TRACKED_ID), "parent_run_id": nullable(_TRACKED_ID),
})
TRACKING = array(TRACKER, max_len=16)

# A training configuration (checked fully by TrainConfig); here only what names a folder of the store.
CONFIG = obj(optional={"dataset": nullable(NAME)})

# -- what turns a model's outputs into probabilities and decisions (dermcam.evaluate.calibration) ----

TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted temperature outside it means the fit failed, not a model
BIAS_LIMIT = 50.0
_SCALE = satisfies(lambda v: _is_number(v) and TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
                   f"is not a number from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}")
_BIAS = satisfies(lambda v: _is_number(v) and math.isfinite(v) and abs(v) <= BIAS_LIMIT,
                  f"is not a finite number from {-BIAS_LIMIT:g} to {BIAS_LIMIT:g}")
_UNIT = satisfies(lambda v: _is_number(v) and 0.0 <= v <= 1.0, "is not a number from 0 to 1")
_OPEN_UNIT = satisfies(lambda v: _is_number(v) and 0.0 < v < 1.0, "is not a number strictly between 0 and 1")


def _vector_parts(value: Any, field: str) -> None:
    """Vector scaling needs its per-class scale and bias; temperature scaling has neither."""
    has = [key for key in ("scale", "bias") if value.get(key) is not None]
    if value["method"] == "vector" and len(has) != 2:
        raise Invalid(_child(field, "scale"), "and 'bias' are required by method 'vector'")
    if value["method"] == "temperature" and has:
        raise Invalid(_child(field, has[0]), "belongs to method 'vector', not 'temperature'")


# Sidecars and exports: ``calibration`` (how raw probabilities become calibrated ones) and
# ``operating_point`` (a threshold on one class's calibrated probability). Only the fields that change
# a probability or a decision are required and range-checked; the rest is the record of the fit.
CALIBRATION = all_of(obj({
    "method": one_of("temperature", "vector"),
    "temperature": _SCALE,
}, optional={
    "scale": nullable(array(_SCALE, min_len=2, max_len=1000)),
    "bias": nullable(array(_BIAS, min_len=2, max_len=1000)),
    "fitted_on": obj(optional={"dataset": nullable(NAME), "split": text(max_len=16), "n": integer(),
                               "lesions": integer(), "fingerprint": nullable(text(max_len=200))}),
    "before": obj(), "after": obj(), "vector_check": nullable(obj()), "created": TIMESTAMP,
}), _vector_parts)

OPERATING_POINT = obj({
    "class": CLASS_NAME,
    "metric": one_of("sensitivity", "specificity"),
    "target": _OPEN_UNIT,
    "threshold": _UNIT,
}, optional={
    "validation": obj(optional={"sensitivity": nullable(_UNIT), "specificity": nullable(_UNIT), "n": integer(),
                                "positives": integer(), "negatives": integer()}),
    "created": TIMESTAMP,
})


def fits_classes(value: Any, field: str) -> None:
    """A document's calibration and operating point must fit its ``classes``: one scale and bias per
    class, and an operating point for a class the model has (else it would silently never apply)."""
    classes = value["classes"]
    calibration = value.get("calibration") or {}
    for key in ("scale", "bias"):
        if calibration.get(key) is not None and len(calibration[key]) != len(classes):
            raise Invalid(_child(_child(field, "calibration"), key), f"does not have one entry per class "
                                                                      f"({len(classes)})")
    point = value.get("operating_point")
    if point is not None and point["class"] not in classes:
        raise Invalid(_child(_child(field, "operating_point"), "class"), "is not one of the model's classes")
    if point is not None and value.get("calibration") is None:
        raise Invalid(_child(field, "operating_point"), "needs a calibration (its threshold is on calibrated "
                                                        "probabilities)")
