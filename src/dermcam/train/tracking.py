"""Training's few hooks into the trackers (:mod:`dermcam.track`): start, each epoch, the end.

The trainer calls these in a handful of lines; everything they need is read off the trainer here, so
the loop stays about training. ``metrics.jsonl``'s record of an epoch is what every tracker plots: it
is written (and the checkpoint saved) before a tracker is called, so a tracker that fails or hangs
never leaves the store behind, and a resumed run logs what its trackers missed from the same records.

Secrets: ``TrainConfig.log`` is masked (:func:`public_config`) before the trainer stores anything, and
the values as given stay in :mod:`dermcam.track.spec`'s memory for this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.progress import Progress
from dermcam.track.base import RunEnd, RunInfo, Tracking, current_parents, epoch_scalars, numbers, spec_key
from dermcam.track.hooks import group, open_tracking
from dermcam.track.spec import parse_log, shown_values

if TYPE_CHECKING:
    from dermcam.train.config import TrainConfig

Trainer = Any  # dermcam.train.trainer.Trainer (which imports this module)


def public_config(config: TrainConfig) -> TrainConfig:
    """``config`` with its ``--log`` values as a run stores them (absolute folders, secrets masked)."""
    if not config.log or not isinstance(config.log, list):  # a wrong type is validate()'s to report
        return config
    return dataclasses.replace(config, log=shown_values(config.log))


def public_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A resume's command-line options, ``log`` masked like :func:`public_config`'s."""
    if isinstance(overrides.get("log"), list):
        return {**overrides, "log": shown_values(overrides["log"])}
    return overrides


def _images_per_epoch(trainer: Trainer) -> int:
    return int(trainer.batches_per_epoch) * int(trainer.config.batch_size)


def start(trainer: Trainer) -> Tracking:
    """The run's trackers, started (a resumed run's reopened) and told what they missed of its history;
    their identities stored in ``run.json`` before the first checkpoint of this attempt names them."""
    from dermcam.store.runs import read_run, update_run
    cfg = trainer.config
    if not cfg.log or not trainer.dist.is_main:
        return Tracking([])
    info = RunInfo(run_id=trainer.run_id, run_dir=Path(trainer.run_dir), config=dataclasses.asdict(cfg),
                   dataset={"name": trainer.data.name, "fingerprint": trainer.data.fingerprint},
                   backbone=cfg.backbone, classes=list(trainer.classes),
                   images_per_epoch=_images_per_epoch(trainer), history=list(trainer.history),
                   previous=list(read_run(trainer.run_dir).get("tracking") or []), parents=current_parents())
    tracking = open_tracking(cfg.log, info, log_model=cfg.log_model, progress=trainer.progress)
    if tracking:
        update_run(trainer.run_dir, tracking=tracking.identities())
    return tracking


def sidecar_fields(trainer: Trainer) -> dict[str, Any]:
    """``{"tracking": [...]}`` for a tracked run's sidecars (where each tracked run is), else nothing."""
    tracking = getattr(trainer, "tracking", None)
    return {"tracking": tracking.identities()} if tracking else {}


def epoch(trainer: Trainer) -> None:
    """The epoch just recorded and saved: its scalars at step = epoch, the latest and best checkpoints."""
    tracking = getattr(trainer, "tracking", None)
    if not tracking or not trainer.history:
        return
    record = trainer.history[-1]
    tags = {"dermcam.last_checkpoint": f"{trainer.run_id}:{record['epoch']}"}
    if trainer.best:
        tags["dermcam.best_checkpoint"] = str(trainer.best["id"])
    tracking.call("log_epoch", int(record["epoch"]), epoch_scalars(record, _images_per_epoch(trainer)), tags)


def export_model(checkpoint_id: str, folder: Path, root: Path | None) -> Path:
    """The checkpoint as ``dermcam ckpt export`` writes it (float32 safetensors with its document), into
    ``folder``; not recorded in the run's exports (the file is temporary: the artefact is the copy)."""
    from dermcam.store.exchange import cast_tensors, default_export_name, export_metadata, export_source, metadata_text
    from dermcam.store.exported import METADATA_KEY
    from dermcam.store.tensors import save_tensors

    ckpt, state = export_source(checkpoint_id, root)
    tensors = cast_tensors(state, "float32")
    meta = export_metadata(ckpt, tensors, "float32")
    out = Path(folder) / default_export_name(ckpt, "float32")
    save_tensors(out, tensors, metadata={"format": "pt", METADATA_KEY: metadata_text(f"checkpoint {ckpt.id}", meta)})
    return out


def finished(trainer: Trainer, result: Any) -> None:
    """The end of a run: test metrics, the report's plots and page, the best sidecar (and with
    ``--log-model`` the exported model); the tracked runs closed as finished."""
    from dermcam.store.checkpoint import epoch_stem

    tracking = getattr(trainer, "tracking", None)
    if not tracking:
        return
    best = result.best_id
    best_epoch = int(best.rpartition(":")[2]) if best else None
    sidecar = Path(trainer.run_dir) / f"{epoch_stem(best_epoch)}.json" if best_epoch is not None else None
    tags = {"dermcam.stopped_early": str(bool(result.stopped_early)).lower(),
            "dermcam.epochs_done": str(result.epochs_done)}
    if best:
        tags["dermcam.best_checkpoint"] = best
    with tempfile.TemporaryDirectory(prefix="dermcam-model-") as folder:
        model = None
        wants_model = trainer.config.log_model and any(t.kind == "mlflow" for t in tracking.active)
        if wants_model and best:
            try:
                model = export_model(best, Path(folder), trainer.root)
            except Exception as exc:  # noqa: BLE001 - the model artefact is optional; the run is complete
                from dermcam.errors import first_line

                trainer.progress.log(f"Warning: the model was not logged: {first_line(exc)}")
        end = RunEnd(best_id=best, best_epoch=best_epoch, best_sidecar=sidecar,
                     last_epoch=trainer.history[-1]["epoch"] if trainer.history else None,
                     test_metrics=result.test_metrics, files=list(result.report_files),
                     stopped_early=bool(result.stopped_early), model_file=model)
        tracking.call("finish", end, tags)
    tracking.close()


def stopped(trainer: Trainer, exc: BaseException) -> None:
    """An error or Ctrl-C ended the run: its tracked runs say so (a resume reopens them)."""
    tracking = getattr(trainer, "tracking", None)
    if not tracking:
        return
    tracking.call("stop", "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
    tracking.close()


# -- several runs of one command: one parent -------------------------------------------------------


def _mlflow_values(configs: list[TrainConfig]) -> list[str]:
    """The distinct ``--log mlflow`` values of ``configs`` (a TOML file may give runs their own)."""
    out: list[str] = []
    for cfg in configs:
        for value in cfg.log or []:
            if value not in out and value.strip().lower().startswith("mlflow"):
                out.append(value)
    return out


@contextlib.contextmanager
def configurations(configs: list[TrainConfig], progress: Progress | None = None) -> Iterator[Any]:
    """Several configurations trained by one command: one MLflow parent run, each run nested under it."""
    from dermcam.train import distributed

    values = _mlflow_values(configs)
    if len(configs) < 2 or not values or not distributed.current().is_main:  # under torchrun: rank 0 tracks
        yield None
        return
    names = sorted({str(c.dataset) for c in configs if c.dataset})
    title = f"{len(configs)} configurations" + (f" on {', '.join(names)}" if names else "")
    with group(values, title, tags={"dermcam.kind": "comparison"}, progress=progress) as parents:
        yield parents


def _parents_of_folds(record: dict[str, Any], root: Path | None) -> dict[str, str]:
    """Tracker key -> the parent run an earlier attempt of this cross-validation made (from its fold
    runs' ``run.json``), so a continued cross-validation stays under one parent."""
    from dermcam.errors import DermcamError
    from dermcam.store.paths import runs_dir
    from dermcam.store.runs import read_run

    found: dict[str, str] = {}
    for entry in record.get("fold_runs") or []:
        run_dir = runs_dir(root) / str(entry.get("run"))
        if not (run_dir / "run.json").is_file():
            continue
        try:
            stored = read_run(run_dir).get("tracking") or []
        except DermcamError:
            continue
        for identity in stored:
            if identity.get("kind") == "mlflow" and identity.get("parent_run_id"):
                found.setdefault(f"mlflow:{identity.get('uri')}", identity["parent_run_id"])
    return found


@contextlib.contextmanager
def cross_validation(record: dict[str, Any], values: list[str] | None, *, root: Path | None = None,
                     progress: Progress | None = None) -> Iterator[Any]:
    """The folds of cross-validation ``record`` as nested runs of one MLflow parent (the same parent
    when it is continued); the parent gets the out-of-fold estimate at the end (:func:`cv_estimate`)."""
    mlflow = [v for v in values or [] if v.strip().lower().startswith("mlflow")]
    if not mlflow:
        yield None
        return
    earlier = _parents_of_folds(record, root)
    reuse = {}
    for value in mlflow:
        with contextlib.suppress(Exception):
            spec = parse_log(value)
            match = earlier.get(spec_key(spec)) or (earlier and spec.target is None and next(iter(earlier.values())))
            if match:
                reuse[spec_key(spec)] = str(match)
    title = f"cv:{record['name']} ({record['folds']} folds)"
    with group(mlflow, title, tags={"dermcam.kind": "cross-validation", "dermcam.cv": str(record["name"])},
               reuse=reuse, progress=progress) as parents:
        yield parents


def cv_estimate(parents: Any, record: dict[str, Any]) -> None:
    """The out-of-fold metrics (``oof_*``) and the folds' ensemble on the cross-validation's parent run."""
    if parents is None:
        return
    metrics = numbers(record.get("metrics") or {}, depth=1)
    parents.log({f"oof_{k}": v for k, v in metrics.items()},
                {"dermcam.ensemble": f"ensemble:{record.get('ensemble')}"} if record.get("ensemble") else {})
