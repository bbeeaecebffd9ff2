"""``dermcam train --folds K``: K-fold cross-validation over the train and val splits together.

The folds (:mod:`dermcam.data.folds`) are grouped like the split, so no lesion, patient or
near-duplicate cluster is in two folds, and stratified, so every class is in every fold. Fold i is an
ordinary run whose configuration says ``folds=K, fold=i``: it trains on the other folds, validates,
selects its best epoch and calibrates on fold i, and never reads the test split. Its rows are a pure
function of (data set, seed, K, i), so it resumes exactly as any run does.

Around the runs, a record in the store (:mod:`dermcam.store.crossval`) names each fold's run before it
starts and follows it to the end: after each fold its best (calibrated) checkpoint predicts its held-out
fold and those out-of-fold predictions are stored; after the last, the pooled predictions are measured
with group-bootstrap intervals (:mod:`dermcam.evaluate.crossval`) and the folds' best checkpoints are
stored as an ensemble of equal weights (each member with its own calibration) under the same name.
An interrupted cross-validation continues with its unfinished fold (resumed exactly) and then the next
ones; a finished fold is never trained again.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError, CorruptError
from dermcam.progress import Progress
from dermcam.train.config import TrainConfig, TrainResult


@dataclass
class CVResult:
    """A finished cross-validation: its record, the out-of-fold estimate and the runs trained now."""

    name: str
    record: dict[str, Any]
    estimate: Any  # dermcam.evaluate.crossval.CVEstimate
    runs: list[TrainResult] = field(default_factory=list)  # fold runs trained or resumed by this call

    @property
    def ensemble(self) -> str:
        return f"ensemble:{self.record['ensemble']}"

    @property
    def warnings(self) -> list[str]:
        return list(self.estimate.warnings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``dermcam train --folds K --json`` prints): the estimate, and the runs of this call."""
        return {**self.estimate.to_dict(), "runs": [r.to_dict() for r in self.runs]}


def default_name(dataset: str, folds: int) -> str:
    """``<data set>-<K>fold-<6 hex digits>``: says what was cross-validated, and never repeats."""
    return f"{dataset[:100]}-{folds}fold-{secrets.token_hex(3)}"


def check_new_ensemble(name: str, root: Path | None = None) -> None:
    """The ensemble the folds will form: a valid new name, not a checkpoint reference, not stored yet."""
    from dermcam.store.ensembles import check_new_name, manifest_path

    check_new_name(name, root)
    if manifest_path(name, root).exists():
        raise BadInputError(f"ensemble '{name}' exists; the folds' ensemble needs a new name (--ensemble NAME)")


def check_cross_validation(config: TrainConfig, name: str | None, root: Path | None = None) -> Any:
    """Everything ``--folds`` needs, refused in one line before any work: a valid configuration without
    a fold of its own, a prepared set that is not external, K no larger than the groups of the smallest
    class, one process, and a name no cross-validation, ensemble or checkpoint reference has.
    Returns the data set."""
    from dermcam.data.dataset import load_prepared
    from dermcam.data.folds import check_folds_fit
    from dermcam.store.crossval import check_new_cv_name
    from dermcam.train.distributed import launched_world_size

    config.validate()
    if config.folds is None:
        raise BadInputError("cross-validation needs --folds K")
    if config.fold is not None:
        raise BadInputError("--folds trains every fold in turn; drop fold (one fold alone is an ordinary run "
                            "with folds and fold in its configuration)")
    if launched_world_size() > 1:
        raise BadInputError("--folds trains its folds one after another in one process; run it without torchrun")
    if name is not None:
        check_new_ensemble(name, root)
        check_new_cv_name(name, root)
    data = load_prepared(config.dataset, root)
    if data.external:
        raise BadInputError(f"data set '{data.name}' was prepared with --external: it is for evaluation only, never "
                            "trained on or cross-validated")
    check_folds_fit(data, config.folds)
    if config.operating_point is not None:
        from dermcam.train.trainer import check_operating_point

        from dermcam.data.folds import pooled_rows

        labels = data.index["label"].to_numpy()[pooled_rows(data)]  # every fold validates on its share of these
        check_operating_point(config, list(data.classes), labels, data.name)
    return data


def cross_validate(config: TrainConfig, *, name: str | None = None, root: Path | None = None,
                   progress: Progress | None = None) -> CVResult:
    """Cross-validate ``config`` with ``config.folds`` folds: record, fold runs, out-of-fold estimate and
    ensemble (``name``: of the record and the ensemble; default :func:`default_name`)."""
    from dermcam.data.folds import pooled_rows
    from dermcam.store.crossval import CV_SCHEMA, OOF_FILE, check_new_cv_name, create_cv
    from dermcam.store.files import utc_now
    from dermcam.store.paths import runs_dir
    from dermcam.store.runs import new_run_id

    data = check_cross_validation(config, name, root)
    if name is None:
        name = default_name(data.name, int(config.folds or 0))
        check_new_ensemble(name, root)
        check_new_cv_name(name, root)
    from dermcam.train.tracking import public_config

    shared = dataclasses.asdict(dataclasses.replace(public_config(config), dataset=data.name, fold=None))  # masked
    run_ids: list[str] = []
    while len(run_ids) < int(config.folds or 0):  # chosen now, so each fold's run is known before it starts
        run_id = new_run_id()
        if run_id not in run_ids and not (runs_dir(root) / run_id).exists():
            run_ids.append(run_id)
    pooled = pooled_rows(data)
    record = {"schema": CV_SCHEMA, "name": name, "created": utc_now(), "status": "running", "folds": config.folds,
              "seed": config.seed, "dataset": {"name": data.name, "fingerprint": data.fingerprint},
              "classes": list(data.classes), "config": shared,
              "fold_runs": [{"fold": i, "run": r, "status": "pending", "best": None} for i, r in enumerate(run_ids)],
              "images": len(pooled), "groups": int(data.index["group"].iloc[pooled].nunique()),
              "oof_file": OOF_FILE, "metrics": None, "ensemble": None}
    create_cv(record, root)
    (progress or Progress()).log(f"Cross-validation cv:{name}: {config.folds} folds of the {len(pooled)} train+val "
                                 f"images of data set '{data.name}' (runs {', '.join(run_ids)})")
    return continue_cross_validation(name, root=root, progress=progress)


def continue_cross_validation(name: str, *, overrides: dict[str, Any] | None = None, root: Path | None = None,
                              progress: Progress | None = None) -> CVResult:
    """Train (or resume) every unfinished fold of cross-validation ``name`` in order, then finish it:
    out-of-fold metrics and the ensemble. ``overrides``: command-line options; of these only
    :data:`dermcam.train.trainer.RESUME_OPTIONS` (where the runs execute) apply, to every fold.

    Holds the ``crossval-<name>`` lock throughout, so two processes never train one cross-validation.
    """
    from dermcam.data.dataset import load_prepared
    from dermcam.store.crossval import read_cv
    from dermcam.store.locks import store_lock
    from dermcam.train.distributed import launched_world_size
    from dermcam.train.trainer import RESUME_OPTIONS

    if launched_world_size() > 1:
        raise BadInputError("a cross-validation trains its folds one after another in one process; continue it "
                            "without torchrun")
    progress = progress or Progress()
    runs: list[TrainResult] = []
    applied = {k: v for k, v in (overrides or {}).items() if k in RESUME_OPTIONS}
    with store_lock(f"crossval-{name}", timeout=1.0, root=root):
        cv = read_cv(name, root)
        record = cv.record
        data = load_prepared(record["dataset"]["name"], root)
        if data.fingerprint != record["dataset"]["fingerprint"]:
            raise BadInputError(f"data set '{data.name}' changed since cross-validation '{name}' started; its folds "
                                "would differ (start a new one: dermcam train --folds K)")
        from dermcam.train import tracking

        # --log mlflow: the fold runs nested under one parent run (the same one when continued)
        with tracking.cross_validation(record, applied.get("log", record["config"].get("log")), root=root,
                                       progress=progress) as parents:
            for fold in cv.unfinished_folds():
                cv, result = _fold(cv, fold, applied, overrides, root, progress)
                if result is not None:
                    runs.append(result)
            cv = _finish(cv, data, root, progress)
            tracking.cv_estimate(parents, cv.record)
    from dermcam.evaluate.crossval import cv_estimate

    return CVResult(name, cv.record, cv_estimate(name, root=root), runs)


def _fold(cv: Any, fold: int, applied: dict[str, Any], overrides: dict[str, Any] | None, root: Path | None,
          progress: Progress) -> tuple[Any, TrainResult | None]:
    """Train fold ``fold`` (new, resumed, or already trained and not yet predicted), then store its
    out-of-fold predictions and mark it finished."""
    from dermcam.store.crossval import set_fold
    from dermcam.store.paths import contained, runs_dir
    from dermcam.store.runs import creation_leftover, read_run
    from dermcam.train.trainer import train

    record = cv.record
    run_id = record["fold_runs"][fold]["run"]
    k = record["folds"]
    cv = set_fold(cv, fold, status="training")
    result = None
    run_dir = contained(runs_dir(root), run_id, "run folder")
    if run_dir.is_dir() and not (run_dir / "run.json").is_file() and creation_leftover(run_dir):
        import shutil  # killed between creating the folder and writing run.json: nothing in it to keep

        shutil.rmtree(run_dir)
    if (run_dir / "run.json").is_file():
        info = read_run(run_dir)
        if info["config"].get("folds") != k or info["config"].get("fold") != fold:
            raise CorruptError(f"run {run_id} is not fold {fold} of {k} (cross-validation '{cv.name}' names it; "
                               "damaged or modified)")
        if info["status"] == "finished" and info.get("best"):
            best = info["best"]  # trained to the end before an interruption; only its predictions are missing
        else:
            progress.log(f"Fold {fold + 1}/{k}: resuming run {run_id}")
            result = train(resume=True, run=run_id, overrides=overrides, root=root, progress=progress)
            best = result.best_id
    else:
        progress.log(f"Fold {fold + 1}/{k}: run {run_id}")
        config = TrainConfig.from_dict({**record["config"], "folds": k, "fold": fold, **applied})
        result = train(config, new_run_id=run_id, root=root, progress=progress)
        best = result.best_id
    if best is None:
        raise BadInputError(f"fold {fold + 1} (run {run_id}) saved no checkpoint; nothing can predict its fold")
    device = applied.get("device") or record["config"].get("device") or "auto"
    return _store_fold(cv, fold, best, device, root, progress), result


def _store_fold(cv: Any, fold: int, best: str, device: str, root: Path | None, progress: Progress) -> Any:
    """Predict the fold's held-out images with its best checkpoint and store them with the others."""
    from dermcam.evaluate.crossval import fold_predictions
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.store.crossval import merge_oof, oof_path, read_oof, set_fold, without_fold, write_oof
    from dermcam.store.references import resolve

    classes = list(cv.record["classes"])
    ckpt = resolve(best, root)
    cv = set_fold(cv, fold, best=ckpt.id)
    predicted = fold_predictions(cv, fold, ckpt, device=device, root=root, progress=progress)
    path = oof_path(cv)
    earlier = [without_fold(read_oof(cv), fold)] if path is not None and path.is_file() else []
    write_oof(cv, merge_oof([*earlier, predicted], len(classes)))
    cv = set_fold(cv, fold, status="finished", images=len(predicted), groups=len(set(map(str, predicted.group))))
    score = compute_metrics(predicted.label, predicted.probs, classes)["balanced_accuracy"]
    progress.log(f"Fold {fold + 1}/{cv.record['folds']}: best {ckpt.id}, balanced accuracy {score:.3f} on its "
                 f"{len(predicted)} held-out images")
    return cv


def _finish(cv: Any, data: Any, root: Path | None, progress: Progress) -> Any:
    """Check that the predictions cover every train+val image exactly once, measure them, and store the
    folds' best checkpoints as the ensemble ``cv.name`` (already there from an interrupted finish: kept
    when it is exactly these members, else an error)."""
    import numpy as np

    from dermcam.data.folds import pooled_rows
    from dermcam.evaluate.crossval import oof_metrics
    from dermcam.store.crossval import read_oof, update_cv

    if cv.finished:
        return cv
    oof = read_oof(cv)
    expected = pooled_rows(data)
    if len(oof) != len(expected) or not np.array_equal(np.sort(oof.row), expected):
        raise CorruptError(f"the out-of-fold predictions of cross-validation '{cv.name}' cover {len(oof)} images, not "
                           f"the {len(expected)} train+val images of data set '{data.name}' (damaged or modified)")
    classes = list(cv.record["classes"])
    metrics = oof_metrics(oof, classes)
    cv = update_cv(cv, metrics=metrics)
    members = [entry["best"] for entry in cv.record["fold_runs"]]
    _store_ensemble(cv.name, members, metrics, cv.record["folds"], root)
    cv = update_cv(cv, status="finished", ensemble=cv.name)
    ci = (metrics.get("ci") or {}).get("intervals") or {}
    interval = ci.get("balanced_accuracy")
    progress.log(f"Cross-validation cv:{cv.name}: out-of-fold balanced accuracy {metrics['balanced_accuracy']:.3f}"
                 + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
                 + f" over {len(oof)} images; ensemble:{cv.name} holds the {len(members)} fold models")
    return cv


def _store_ensemble(name: str, members: list[str], metrics: dict[str, Any], folds: int, root: Path | None) -> None:
    """The folds' best checkpoints as one ensemble: equal weights, each member with its own calibration.
    No validation score is attached: every image outside the test split trained some member."""
    from dermcam.evaluate.ensemble import SUMMARY
    from dermcam.store.ensembles import manifest_path, new_manifest, read_ensemble, save_ensemble
    from dermcam.store.references import resolve

    if manifest_path(name, root).is_file():
        existing = read_ensemble(name, root)
        if sorted(existing.member_ids) == sorted(members):
            return  # made by an earlier attempt that stopped before the record said so
        raise BadInputError(f"an ensemble '{name}' with other members was created meanwhile; remove it "
                            f"(dermcam ensemble rm {name}) and continue with: dermcam train --resume --run cv:{name}")
    selection = {"method": "cross-validation", "cv": name, "folds": folds,
                 "oof_metrics": {k: metrics[k] for k in SUMMARY if k in metrics}}
    ckpts = [resolve(m, root) for m in members]
    save_ensemble(new_manifest(name, ckpts, [1.0] * len(ckpts), selection=selection, root=root), root=root)


def train_or_cross_validate(options: dict[str, Any], *, grid: dict[str, list[Any]] | None = None,
                            config_file: Path | None = None, resume: bool = False, run: str | None = None,
                            cv_name: str | None = None, root: Path | None = None, threads: int | str | None = None,
                            progress: Progress | None = None) -> list[TrainResult] | CVResult:
    """What ``dermcam train`` does: :func:`dermcam.train.trainer.train_configurations` (a list of results),
    or a cross-validation (a :class:`CVResult`): with ``folds`` in ``options``, of the one configuration
    they and ``grid`` give (``cv_name``: its name and its ensemble's); with ``resume``, when ``run`` is
    ``cv:NAME`` or the run to resume is a fold of one, its unfinished folds and its end."""
    from dermcam.train.trainer import train_configurations

    grid = {k: v for k, v in (grid or {}).items() if v}
    if resume:
        name = cross_validation_to_resume(run, root)
        if name is not None:
            _apply_threads(threads)
            flat = {**options, **{k: v[-1] for k, v in grid.items()}}
            return continue_cross_validation(name, overrides=flat, root=root, progress=progress)
    elif options.get("folds") is not None:
        if run is not None:
            raise BadInputError("--run names the run to continue and needs --resume")
        if config_file is not None:
            raise BadInputError("--folds cross-validates one configuration; drop --config")
        several = [k for k, v in grid.items() if len(v) > 1]
        if several:
            raise BadInputError(f"--folds cross-validates one configuration; give --{several[0].replace('_', '-')} "
                                "once")
        config = TrainConfig.from_dict({**options, **{k: v[0] for k, v in grid.items()}})
        _apply_threads(threads)
        return cross_validate(config, name=cv_name, root=root, progress=progress)
    return train_configurations(options, grid=grid, config_file=config_file, resume=resume, run=run, root=root,
                                threads=threads, progress=progress)


def _apply_threads(threads: int | str | None) -> None:
    """``--threads`` as :func:`dermcam.train.trainer.train_configurations` applies it (None: torch's own)."""
    if threads is not None:
        from dermcam.models.device import apply_threads

        apply_threads(threads)


def cross_validation_to_resume(run: str | None, root: Path | None = None) -> str | None:
    """The cross-validation ``train --resume [--run RUN]`` continues: ``cv:NAME`` names it; else the run
    that resume picks (``run``, or the latest) when it is a fold of one; None for an ordinary run."""
    from dermcam.store.crossval import cv_name, cv_of_run, read_cv
    from dermcam.store.runs import read_run, resumable_run

    name = cv_name(run)
    if name is not None:
        return read_cv(name, root).name  # NotFoundError listing the others, before any work
    run_dir = resumable_run(run, root)
    config = read_run(run_dir)["config"]
    if config.get("folds") is None:
        return None
    cv = cv_of_run(run_dir.name, root)
    return cv.name if cv is not None else None
