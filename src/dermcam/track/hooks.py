"""Opening trackers: a run's (:func:`open_tracking`), the parent run of several (:func:`group`), and a
tracked run reopened for a later command's result (:func:`log_result`).

Apart from :mod:`dermcam.track.base` so that the interface imports no tracker: this module knows them
all, and imports each (and its package) only when a value asks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dermcam.errors import first_line
from dermcam.progress import Progress
from dermcam.track.base import PARENTS, RunInfo, Tracker, Tracking, current_parents, spec_key
from dermcam.track.spec import LogSpec, parse_log, scrub


def make_tracker(spec: LogSpec, log_model: bool = False) -> Tracker:
    """The tracker of ``spec`` (its package is imported when it starts, not here)."""
    if spec.kind == "tensorboard":
        from dermcam.track.tensorboard import TensorBoardTracker

        return TensorBoardTracker(spec)
    from dermcam.track.mlflow_tracker import MlflowTracker

    return MlflowTracker(spec, log_model=log_model)


def open_tracking(values: list[str] | None, run: RunInfo, *, log_model: bool = False,
                  progress: Progress | None = None) -> Tracking:
    """The trackers ``values`` (``--log``, as the run's configuration stores them) started for ``run``.
    A value that no longer parses or whose package is gone (a resume on another machine) is a
    warning, like a tracker that fails to start: the run trains on without it."""
    from dermcam.errors import DermcamError
    from dermcam.track.spec import missing_extra

    progress = progress or Progress()
    trackers: list[Tracker] = []
    for value in values or []:
        try:
            spec = parse_log(value)
        except DermcamError as exc:
            progress.log(f"Warning: not tracking to {value!r}: {exc}")
            continue
        problem = missing_extra(spec.kind)
        if problem:
            progress.log(f"Warning: not tracking to {spec.shown}: {problem}")
            continue
        trackers.append(make_tracker(spec, log_model))
    tracking = Tracking(trackers, progress)
    tracking.call("start", run)
    for i, tracker in enumerate(tracking.trackers):
        if i not in tracking.failed:
            progress.log(f"Tracking: {scrub(tracker.describe())}")
    return tracking


@contextlib.contextmanager
def group(values: list[str] | None, title: str, *, tags: Mapping[str, str] | None = None,
          reuse: Mapping[str, str] | None = None, progress: Progress | None = None) -> Iterator[ParentRuns]:
    """Group the runs started inside: for each MLflow tracker of ``values``, one parent run titled
    ``title`` (``reuse``: tracker key -> the parent run id an earlier attempt made, reopened instead);
    the runs become its nested runs. TensorBoard needs no parent (each run is a folder of one tree).
    The parents are closed as finished, or failed when the block raises."""
    from dermcam.errors import DermcamError
    from dermcam.track.spec import missing_extra

    progress = progress or Progress()
    parents = ParentRuns(progress)
    for value in values or []:
        try:
            spec = parse_log(value)
        except DermcamError:
            continue  # the runs report it
        if spec.kind != "mlflow" or missing_extra("mlflow"):
            continue
        from dermcam.track.mlflow_tracker import MlflowParent

        parents.add(MlflowParent(spec), title, dict(tags or {}), (reuse or {}).get(spec_key(spec)))
    token = PARENTS.set({**current_parents(), **parents.identities()})
    status = "FAILED"
    try:
        yield parents
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        PARENTS.reset(token)
        parents.close(status)


class ParentRuns:
    """The parent runs of a :func:`group`, each a side channel like a run's trackers."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.parents: list[Any] = []

    def add(self, parent: Any, title: str, tags: dict[str, str], reuse: str | None) -> None:
        try:
            parent.open(title, tags, reuse)
        except Exception as exc:  # noqa: BLE001 - the runs go on without a parent
            self.progress.log(f"Warning: {parent.label} parent run not created ({scrub(parent.where)}): "
                              f"{scrub(first_line(exc, 300))}; the runs are tracked without one")
            return
        self.parents.append(parent)

    def identities(self) -> dict[str, dict[str, Any]]:
        return {spec_key(p.spec): p.identity() for p in self.parents}

    def log(self, scalars: Mapping[str, float], tags: Mapping[str, str] | None = None) -> None:
        """Scalars (and tags) on every parent: a cross-validation's out-of-fold estimate."""
        for parent in list(self.parents):
            try:
                parent.log(scalars, dict(tags or {}))
            except Exception as exc:  # noqa: BLE001
                self.progress.log(f"Warning: {parent.label} logging stopped ({scrub(parent.where)}): "
                                  f"{scrub(first_line(exc, 300))}")
                self.parents.remove(parent)

    def close(self, status: str) -> None:
        for parent in self.parents:
            with contextlib.suppress(Exception):
                parent.close(status)


# -- later commands: evaluate, calibrate, ensemble create ------------------------------------------


def log_result(sidecar: Mapping[str, Any], name: str, scalars: Mapping[str, float], *,
               files: list[Path] | None = None, tags: Mapping[str, str] | None = None, root: Path | None = None,
               progress: Progress | None = None) -> None:
    """Log a command's result to the tracked run that checkpoint ``sidecar`` belongs to (nothing when
    it was not tracked): scalars as ``name/<metric>`` at step = its epoch, ``files`` as artefacts under
    ``name``. Skipped for an imported checkpoint (its tracking, if any, is another store's) and while
    its run is training (training logs its own end). Failures are one warning each, never an error."""
    from dermcam.store.locks import is_locked
    from dermcam.store.paths import runs_dir

    stored = sidecar.get("tracking") or []
    if not stored or sidecar.get("imported") or "run_id" not in sidecar:
        return
    run_id = str(sidecar["run_id"])
    if is_locked(f"run-{run_id}", root):  # training right now: it logs its own end
        return
    progress = progress or Progress()
    from dermcam.track.spec import missing_extra

    trackers: list[Tracker] = []
    for identity in stored:
        kind = identity.get("kind")
        if kind not in ("tensorboard", "mlflow") or missing_extra(kind):
            continue
        if kind == "tensorboard":
            from dermcam.track.tensorboard import TensorBoardTracker

            trackers.append(TensorBoardTracker.reopen(identity, runs_dir(root) / run_id))
        elif identity.get("run_id"):
            from dermcam.track.mlflow_tracker import MlflowTracker

            trackers.append(MlflowTracker.reopen(identity))
    if not trackers:
        return
    tracking = Tracking(trackers, progress)
    tracking.call("log_result", name, int(sidecar.get("epoch") or 0), dict(scalars), list(files or []),
                  dict(tags or {}))
    tracking.close()
