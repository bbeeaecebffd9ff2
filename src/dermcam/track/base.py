"""The tracker interface and the fan-out that makes a tracker a side channel.

Training calls a :class:`Tracking` (start, each epoch, the end); it forwards every call to each of its
trackers and catches what they raise. The first failure of a tracker (a server down, slow past the
timeout, refusing a request; a full disk under a TensorBoard folder) is reported once through the
run's progress (``Warning: MLflow logging stopped (...)``), and that tracker is left out for the rest
of the run. Nothing a tracker does can stop training or leave the store incomplete: the store is the
record of the run, written before any tracker is called.

A tracked run's identity (:meth:`Tracker.identity`: kind, masked URI or folder, MLflow run and
experiment ids) is stored in ``run.json`` and in every sidecar (``tracking``; checked by
:data:`dermcam.store.schema.TRACKING`), so ``train --resume`` reopens the same MLflow run and writes on
in the same TensorBoard folder, and ``evaluate``, ``calibrate`` and ``ensemble create`` log their results
to the run a checkpoint came from (:func:`dermcam.track.hooks.log_result`).

Several runs of one command (a grid of configurations, the folds of a cross-validation) are grouped:
:func:`dermcam.track.hooks.group` opens one MLflow parent run and each run becomes a nested run under
it (:data:`PARENTS` says which to the runs started inside).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.errors import first_line
from dermcam.progress import Progress
from dermcam.track.spec import LogSpec, scrub


@dataclass
class RunInfo:
    """The dermcam run a tracker mirrors, as plain data (``track`` knows nothing of the trainer)."""

    run_id: str
    run_dir: Path
    config: dict[str, Any]  # the run's configuration as stored (``log`` masked)
    dataset: dict[str, Any]  # {"name", "fingerprint"}
    backbone: str
    classes: list[str]
    images_per_epoch: int  # training images per epoch: images/s = this / epoch seconds
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records so far (a resume)
    previous: list[dict[str, Any]] = field(default_factory=list)  # identities stored by an earlier attempt
    parents: dict[str, dict[str, Any]] = field(default_factory=dict)  # tracker key -> its parent run


@dataclass
class RunEnd:
    """What a finished run hands its trackers: the best checkpoint, the test metrics and the report."""

    best_id: str | None
    best_epoch: int | None
    best_sidecar: Path | None
    last_epoch: int | None
    test_metrics: dict[str, Any] | None
    files: list[Path]  # report files: PNGs, metrics.json, report.html
    stopped_early: bool = False
    model_file: Path | None = None  # the exported model (--log-model)


def numbers(values: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, float]:
    """The finite numbers of ``values`` (nested objects flattened to ``a.b``, ``depth`` levels; lists,
    text, booleans, NaN and the bootstrap intervals left out): what a tracker can plot."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1 and key != "ci":
            out.update(numbers(value, f"{name}.", depth - 1))
    return out


def epoch_scalars(record: Mapping[str, Any], images_per_epoch: int) -> dict[str, float]:
    """One ``metrics.jsonl`` record as tracked scalars (names shared by both trackers): ``train_loss``,
    ``lr``, every ``val_*`` metric, ``epoch_seconds`` and ``images_per_second`` (training images over
    the whole epoch's time, validation included)."""
    values = numbers({k: v for k, v in record.items() if k not in ("epoch", "step", "seconds")}, depth=1)
    seconds = record.get("seconds")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
        values["epoch_seconds"] = float(seconds)
        values["images_per_second"] = images_per_epoch / float(seconds)
    return values


class Tracker:
    """One tracker of one run. Subclasses override what they record; every method may raise (the
    :class:`Tracking` around it catches it)."""

    kind = ""

    def __init__(self, spec: LogSpec) -> None:
        self.spec = spec

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def where(self) -> str:
        """The destination as messages show it (masked)."""
        return self.spec.shown_target or "default"

    def identity(self) -> dict[str, Any]:
        """What the run stores to find this tracked run again (no secret in it)."""
        return {"kind": self.kind}

    def matches(self, stored: Mapping[str, Any]) -> bool:
        """Whether ``stored`` (an identity from run.json or a sidecar) is this tracker's run."""
        return stored.get("kind") == self.kind

    def describe(self) -> str:
        """A line for the run's log: where to look."""
        return f"{self.label}: {self.where}"

    def start(self, run: RunInfo) -> None:
        """Open (or reopen, after a resume) the tracked run and log what it has not seen of ``run.history``."""

    def log_epoch(self, epoch: int, scalars: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """One epoch's scalars (step = epoch) and tags (the latest and the best checkpoint)."""

    def finish(self, end: RunEnd, tags: Mapping[str, str]) -> None:
        """The end: test metrics, images and artefacts; the tracked run is closed as finished."""

    def stop(self, status: str) -> None:
        """The run stopped early (``failed`` or ``interrupted``); a resume reopens it."""

    def log_result(self, name: str, step: int, scalars: Mapping[str, float], files: list[Path],
                   tags: Mapping[str, str]) -> None:
        """A later command's result (evaluate, calibrate, an ensemble) under ``name``/... at ``step``."""

    def close(self) -> None:
        """Release what the tracker holds (files, connections); never raises past the fan-out."""


class Tracking:
    """The trackers of one run, each a side channel: a call that fails is reported once (through
    ``progress``, where the trainer's warnings go) and that tracker is not called again."""

    def __init__(self, trackers: list[Tracker], progress: Progress | None = None) -> None:
        self.trackers = list(trackers)
        self.progress = progress or Progress()
        self.failed: dict[int, str] = {}  # index -> the one-line reason it stopped

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def active(self) -> list[Tracker]:
        return [t for i, t in enumerate(self.trackers) if i not in self.failed]

    def identities(self) -> list[dict[str, Any]]:
        """Every tracker's identity, those that failed too (a resume tries them again)."""
        out = []
        for tracker in self.trackers:
            try:
                out.append(tracker.identity())
            except Exception:  # noqa: BLE001 - an identity is a dict of known fields; never fail a save over it
                out.append({"kind": tracker.kind})
        return out

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """``tracker.method(*args)`` on every active tracker; an exception disables that one."""
        for i, tracker in enumerate(self.trackers):
            if i in self.failed:
                continue
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure of a side channel is reported, never raised
                self.fail(i, exc)

    def fail(self, i: int, exc: BaseException) -> None:
        tracker = self.trackers[i]
        reason = scrub(first_line(exc, 300))
        self.failed[i] = reason
        self.progress.log(f"Warning: {tracker.label} logging stopped ({scrub(tracker.where)}): {reason}. "
                          "Training goes on; the store keeps the whole run.")
        with contextlib.suppress(Exception):
            tracker.close()

    def close(self) -> None:
        for tracker in self.trackers:
            with contextlib.suppress(Exception):
                tracker.close()


# -- parent runs: several runs of one command ------------------------------------------------------

PARENTS: contextvars.ContextVar[dict[str, dict[str, Any]] | None] = contextvars.ContextVar("dermcam_track_parents",
                                                                                          default=None)


def current_parents() -> dict[str, dict[str, Any]]:
    """Parent runs of the :func:`group` this code runs in: tracker key (``mlflow:URI``) -> identity."""
    return dict(PARENTS.get() or {})


def spec_key(spec: LogSpec) -> str:
    """How a parent run is found for a tracker: its kind and masked target."""
    return spec.shown
