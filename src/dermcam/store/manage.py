"""Checkpoint management: list, prune, verify and restore what training left in the store.

Everything here ranks and decides from the sidecars on disk (never from a trainer's memory), so the
ranking survives resumes, crashes and copies between machines. Operations that delete files hold the
exclusive ``store`` lock, which training takes shared while it writes a checkpoint: a prune or a clean
never sees half a checkpoint, and training never sees a checkpoint vanish mid-write.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError, CorruptError, LockedError
from dermcam.progress import Progress
from dermcam.store.checkpoint import Checkpoint, Damage, best_of, rank_key, run_checkpoints, scan_run
from dermcam.store.exchange import import_exported
from dermcam.store.exported import is_exported_file
from dermcam.store.files import TMP_SUFFIX, recently_written, sha256_file
from dermcam.store.locks import is_locked, store_lock
from dermcam.store.references import find_checkpoint
from dermcam.store.runs import (
    creation_leftover,
    find_run,
    incomplete_files,
    read_run,
    resume_point,
    run_folders,
    scan_checkpoints,
    scan_metrics,
    update_run,
)
from dermcam.store.tensors import state_outline

# Metrics shown as columns by ``ckpt list`` (sidecar "metrics" keys), in order.
LIST_METRICS = ("balanced_accuracy", "macro_f1", "recall_mel", "auc_macro")


# Sort keys that are not metrics; "age" sorts newest first.
_SORT_FIELDS = ("epoch", "age", "size", "monitor")


def run_is_active(run_id: str, root: Path | None = None) -> bool:
    """True while a training process holds the run's lock (it is writing checkpoints right now)."""
    return is_locked(f"run-{run_id}", root)


def _age_seconds(created: str | None) -> float | None:
    if not created:
        return None
    try:
        then = _dt.datetime.fromisoformat(created)
    except ValueError:
        return None
    return max(0.0, (_dt.datetime.now(_dt.timezone.utc) - then).total_seconds())


def describe(ckpt: Checkpoint, flags: list[str], exports: list[dict[str, Any]]) -> dict[str, Any]:
    """One checkpoint as plain data (what ``ckpt list --json`` prints per checkpoint)."""
    side = ckpt.sidecar
    return {
        "id": ckpt.id,
        "run_id": ckpt.run_id,
        "epoch": ckpt.epoch,
        "backbone": side.get("backbone"),
        "dataset": (side.get("dataset") or {}).get("name"),
        "monitor": ckpt.monitor,
        "metrics": {k: v for k, v in (side.get("metrics") or {}).items() if isinstance(v, (int, float))},
        "size": ckpt.size_bytes(),
        "created": side.get("created"),
        "age_seconds": _age_seconds(side.get("created")),
        "resumable": ckpt.state_path is not None,
        "flags": flags,
        "exports": exports,
        "imported": side.get("imported"),
        "tracking": side.get("tracking") or [],  # MLflow run / TensorBoard folder of its run (dermcam.track)
        "sha256": side["weights"]["sha256"],
        "path": str(ckpt.weights_path),
        "rank_group": str(ckpt.rank_group),
        "problem": None,
    }


def describe_damage(damage: Damage) -> dict[str, Any]:
    """A damaged sidecar or run.json as a ``ckpt list`` row: same keys, ``problem`` says what is wrong."""
    return {"id": damage.id, "run_id": damage.run_id, "epoch": damage.epoch, "backbone": None, "dataset": None,
            "monitor": {}, "metrics": {}, "size": damage.path.stat().st_size if damage.path.is_file() else 0,
            "created": None, "age_seconds": None, "resumable": False, "flags": ["damaged"], "exports": [],
            "imported": None, "tracking": [], "sha256": None, "path": str(damage.path), "rank_group": None,
            "problem": damage.problem}


def _sort_value(row: dict[str, Any], key: str) -> tuple[int, float]:
    """(missing?, value) with smaller = listed first: best metric first, losses ascending, damage last."""
    if row["problem"]:
        return 2, 0.0
    if key == "epoch":
        return 0, float(row["epoch"])
    if key == "size":
        return 0, -float(row["size"])
    if key == "age":
        age = row["age_seconds"]
        return (1, 0.0) if age is None else (0, age)
    if key == "monitor":
        value, mode = row["monitor"].get("value"), row["monitor"].get("mode", "max")
    else:
        value, mode = row["metrics"].get(key), "min" if "loss" in key else "max"
    if value is None:
        return 1, 0.0
    return 0, float(value) if mode == "min" else -float(value)


def list_checkpoint_rows(run: str | None = None, sort: str | None = None,
                         root: Path | None = None) -> list[dict[str, Any]]:
    """Every complete checkpoint (or one run's) with metrics and flags, listing order or ``sort``.

    Flags: ``best`` (what ``best`` resolves to, across all runs), ``run-best`` (best of its run by its
    monitored metric), ``latest`` (its run's resume point), ``exported``, ``imported``, ``training``
    (its run is training right now), ``damaged`` (a sidecar or run.json that failed validation; its
    ``problem`` says why, and it is listed last). ``rank_group`` says what a checkpoint is ranked
    against: ``best`` competes only among checkpoints sharing the newest one's group (see
    :func:`dermcam.store.checkpoint.best_of`).
    """
    from dermcam.store.exchange import exports_of, read_exports

    everything, damaged = scan_checkpoints(root)
    overall = best_of(everything)
    if run:
        shown, damaged = scan_checkpoints(root, run)
    else:
        shown = everything
    by_run: dict[str, list[Checkpoint]] = {}
    for ckpt in shown:
        by_run.setdefault(ckpt.run_id, []).append(ckpt)
    rows = []
    for run_id, ckpts in by_run.items():
        run_best = best_of(ckpts)
        resume = resume_point(ckpts[0].run_dir)
        active = run_is_active(run_id, root)
        records = read_exports(ckpts[0].run_dir)
        for ckpt in ckpts:
            exports = exports_of(ckpt, records)
            flags = [name for name, on in (
                ("best", overall is not None and ckpt.id == overall.id),
                ("run-best", run_best is not None and ckpt.id == run_best.id),
                ("latest", resume is not None and ckpt.id == resume.id),
                ("exported", bool(exports)),
                ("imported", bool(ckpt.sidecar.get("imported"))),
                ("training", active)) if on]
            rows.append(describe(ckpt, flags, exports))
    rows += [describe_damage(d) for d in damaged]
    if sort:
        key = sort.removeprefix("val_")
        if key not in _SORT_FIELDS and rows and not any(key in r["metrics"] for r in rows):
            known = sorted({k for r in rows for k in r["metrics"]} | set(_SORT_FIELDS))
            raise BadInputError(f"no checkpoint has metric '{sort}'; sort by one of: {', '.join(known)}")
        rows.sort(key=lambda r: _sort_value(r, key))
    return rows


@dataclass
class PrunePlan:
    """Which checkpoints stay (with every reason) and which go."""

    keep: dict[str, list[str]] = field(default_factory=dict)
    delete: list[Checkpoint] = field(default_factory=list)

    def mark(self, ckpts: Iterable[Checkpoint | None], reason: str) -> None:
        for ckpt in ckpts:
            if ckpt is not None:
                self.keep.setdefault(ckpt.id, []).append(reason)


def _ranked(ckpts: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Best first by the monitored metric; ties go to the earlier checkpoint (as ``better`` does)."""
    return sorted(ckpts, key=lambda c: (rank_key(c), c.sidecar.get("created", ""), c.epoch))


def plan_prune(by_run: dict[str, list[Checkpoint]], *, keep_best: int, keep_last: int = 0,
               global_rank: bool = False, keep_latest: bool = True,
               active: Iterable[str] = ()) -> PrunePlan:
    """Decide what to keep: the N best (per run or overall), each run's resume point, its last M,
    and, for runs that are training now, their latest and best whatever the options say."""
    plan = PrunePlan()
    everything = [c for ckpts in by_run.values() for c in ckpts]
    if global_rank:
        plan.mark(_ranked(everything)[:keep_best], "best")
    active = set(active)
    for run_id, ckpts in by_run.items():
        ckpts = sorted(ckpts, key=lambda c: c.epoch)
        if not global_rank:
            plan.mark(_ranked(ckpts)[:keep_best], "best")
        if keep_last:
            plan.mark(ckpts[-keep_last:], "last")
        resume = resume_point(ckpts[0].run_dir) if ckpts else None
        if keep_latest:
            plan.mark([resume], "latest")
        if run_id in active:
            plan.mark(_needed_by_training(ckpts), "training")
    plan.delete = [c for c in everything if c.id not in plan.keep]
    return plan


def _needed_by_training(ckpts: list[Checkpoint]) -> list[Checkpoint | None]:
    """What a running training process may still read: the checkpoint it wrote last (by time, not
    epoch: after a rollback, higher stale epochs can exist), the resume point, the best by sidecars and
    the best its own training state names (they differ when stale epochs outrank the resumed ones)."""
    newest = max(ckpts, key=lambda c: c.sidecar_path.stat().st_mtime_ns)
    state_best = _state_best_id(newest)
    return [newest, resume_point(newest.run_dir), best_of(ckpts),
            next((c for c in ckpts if c.id == state_best), None)]


def _state_best_id(ckpt: Checkpoint) -> str | None:
    """The ``best`` checkpoint id recorded in a checkpoint's training state (see dermcam.train.trainer);
    the sidecar validator has already checked its shape."""
    state = ckpt.sidecar.get("state")
    best = state_outline(state["json"]).get("best") if state else None
    return best["id"] if best else None


def _check_global(ckpts: list[Checkpoint]) -> None:
    """--global ranks everything together, which only means something within one rank group."""
    groups = {c.rank_group for c in ckpts if c.monitor_value is not None}
    if len(groups) > 1:
        names = "; ".join(sorted(map(str, groups)))
        raise BadInputError(f"runs monitor different metrics or were trained on different data sets or classes "
                            f"({names}); --global cannot rank them together, prune per run instead")


def delete_checkpoint(ckpt: Checkpoint) -> int:
    """Remove one checkpoint, sidecar FIRST: an interruption leaves orphan weights (which
    ``ckpt verify --clean`` removes), never a sidecar pointing at missing weights. Returns bytes freed."""
    freed = 0
    for path in [ckpt.sidecar_path] + [p for p in ckpt.files() if p != ckpt.sidecar_path]:
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
    return freed


def prune(*, keep_best: int, keep_last: int = 0, run: str | None = None, global_rank: bool = False,
          keep_latest: bool = True, dry_run: bool = False, only: set[str] | None = None, force: bool = False,
          root: Path | None = None) -> dict[str, Any]:
    """Delete every checkpoint that no keep rule protects; see :func:`plan_prune` for the rules.

    Members of an ensemble are kept (reason ``ensemble NAME``) unless ``force``; then they go and the
    result lists them under ``ensemble_members_removed``, since those ensembles will no longer load.
    The best checkpoint of each fold of a cross-validation is kept the same way (reason
    ``cross-validation NAME``, whether it is still running or its ensemble was removed since; with
    ``force``: listed under ``cv_folds_removed``). A damaged ensemble manifest or cross-validation record
    cannot say what it needs, so prune refuses (exit 4) unless ``force``.

    The plan is computed and carried out under the exclusive store lock, from the sidecars as they
    are at that moment. ``only`` restricts deletion to ids the user already confirmed (a checkpoint
    that became worth keeping since the dry run stays).
    """
    if keep_best < 0 or keep_last < 0:
        raise BadInputError("--keep-best and --keep-last must be 0 or more")
    if global_rank and run:
        raise BadInputError("--global ranks across all runs; it cannot be combined with --run")
    # A dry run only reads (sidecars are written atomically), so it takes no lock and creates no file.
    with contextlib.nullcontext() if dry_run else store_lock("store", root=root):
        ckpts, damaged = scan_checkpoints(root, run)
        if global_rank:
            _check_global(ckpts)
        by_run: dict[str, list[Checkpoint]] = {}
        for ckpt in ckpts:
            by_run.setdefault(ckpt.run_id, []).append(ckpt)
        active = [r for r in by_run if run_is_active(r, root)]
        in_use = _ensemble_members(force, root)
        cv_folds = _cv_folds(force, root)
        plan = plan_prune(by_run, keep_best=keep_best, keep_last=keep_last, global_rank=global_rank,
                          keep_latest=keep_latest, active=active)
        if not force:
            for ckpt in ckpts:
                for name in in_use.get(ckpt.id, []):
                    plan.mark([ckpt], f"ensemble {name}")
                for name in cv_folds.get(ckpt.id, []):
                    plan.mark([ckpt], f"cross-validation {name}")
            plan.delete = [c for c in plan.delete if c.id not in plan.keep]
        doomed = [c for c in plan.delete if only is None or c.id in only]
        removed = []
        for ckpt in doomed:
            size = ckpt.size_bytes()
            if not dry_run:
                size = delete_checkpoint(ckpt)
            removed.append({"id": ckpt.id, "run_id": ckpt.run_id, "epoch": ckpt.epoch,
                            "monitor": ckpt.monitor, "bytes": size})
        if not dry_run:
            _clear_dangling_pointers({c.run_id: c for c in doomed}.values(), {c.id for c in doomed})
    # Damaged sidecars and runs are never deleted (nor followed): the user decides, see ckpt verify.
    kept = [{"id": c.id, "reasons": plan.keep[c.id]} for c in ckpts if c.id in plan.keep]
    kept += [{"id": d.id, "reasons": ["damaged"]} for d in damaged]
    members_removed = [{"id": r["id"], "ensembles": in_use[r["id"]]} for r in removed if r["id"] in in_use]
    return {"dry_run": dry_run, "removed": removed, "kept": kept, "active_runs": active,
            "ensemble_members_removed": members_removed,
            "cv_folds_removed": [{"id": r["id"], "cross_validations": cv_folds[r["id"]]}
                                 for r in removed if r["id"] in cv_folds],
            "bytes_freed": sum(r["bytes"] for r in removed),
            "damaged": [{"id": d.id, "path": str(d.path), "problem": d.problem} for d in damaged]}


def _damaged_ensembles(root: Path | None) -> list[Any]:
    from dermcam.store.ensembles import scan_ensembles

    return scan_ensembles(root)[1]


def _unusable_ensembles(root: Path | None) -> list[Any]:
    from dermcam.store.ensembles import unusable_ensembles

    return unusable_ensembles(root)


def _unusable_cvs(root: Path | None) -> list[Any]:
    from dermcam.store.crossval import unusable_cvs

    return unusable_cvs(root)


def _ensemble_members(force: bool, root: Path | None) -> dict[str, list[str]]:
    """Checkpoint id -> ensembles naming it; a damaged manifest stops a prune that is not forced."""
    from dermcam.store.ensembles import members_in_use

    damaged = _damaged_ensembles(root)
    if damaged and not force:
        raise CorruptError(f"{damaged[0].problem}; prune cannot tell which checkpoints that ensemble needs. "
                           "Remove it (dermcam ensemble rm NAME) or prune with --force")
    return members_in_use(root)


def _cv_folds(force: bool, root: Path | None) -> dict[str, list[str]]:
    """Checkpoint id -> cross-validations naming it as a fold's best (:func:`_ensemble_members`'s rule for
    records: a damaged one stops a prune that is not forced)."""
    from dermcam.store.crossval import folds_in_use, scan_cvs

    damaged = scan_cvs(root)[1]
    if damaged and not force:
        raise CorruptError(f"{damaged[0].problem}; prune cannot tell which fold checkpoints that cross-validation "
                           f"needs. Repair or remove {damaged[0].path.parent}, or prune with --force")
    return folds_in_use(root)


def _clear_dangling_pointers(ckpts: Iterable[Checkpoint], removed: set[str]) -> None:
    """A run whose rollback pointer named a removed checkpoint resumes from its latest again."""
    for ckpt in ckpts:
        if read_run(ckpt.run_dir).get("resume_from") in removed:
            update_run(ckpt.run_dir, resume_from=None)


def _hash_problem(path: Path | None, expected: dict[str, Any] | None, what: str) -> str | None:
    if path is None or expected is None:
        return None
    if not path.is_file():
        return f"{what} file {path.name} is missing"
    if "size" in expected and path.stat().st_size != expected["size"]:
        return f"{what} file {path.name} has {path.stat().st_size} bytes, its sidecar says {expected['size']}"
    try:
        actual = sha256_file(path)
    except OSError as exc:
        return f"{what} file {path.name} is unreadable ({exc.strerror})"
    if actual != expected.get("sha256"):
        return f"{what} file {path.name} does not match its sha256 (damaged or modified)"
    return None


def verify_store(*, clean: bool = False, root: Path | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Re-hash every checkpoint's files and check every sidecar; optionally clean interrupted writes.

    Damaged: a sidecar, run.json or metrics line that fails validation, a missing file, a size or
    hash mismatch, an ensemble manifest that fails validation, a cross-validation record that fails validation
    or disagrees with its runs or predictions (:func:`dermcam.store.crossval.check_cv`); never deleted: the
    user decides. Incomplete: weights/state files with no sidecar,
    ``*.tmp`` temporaries and run folders that run creation left (see ``runs.creation_leftover``):
    what an interrupted write, prune or start leaves. ``clean`` deletes those, except in runs that are
    training right now and what may still be being written (younger than ``FRESH_TEMPORARY_S``).
    """
    progress = progress or Progress()
    report: dict[str, Any] = {"checked": 0, "ok": [], "damaged": [], "incomplete": []}
    with store_lock("store", shared=not clean, root=root):
        folders, outside = run_folders(root)
        report["damaged"] += [{"path": str(d.path), "problem": d.problem} for d in outside]
        report["damaged"] += [{"path": str(d.path), "problem": d.problem} for d in _unusable_ensembles(root)]
        report["damaged"] += [{"path": str(d.path), "problem": d.problem} for d in _unusable_cvs(root)]
        leftovers = [run for run in folders if creation_leftover(run)]
        scans = {run: scan_run(run) for run in folders if run not in leftovers}
        report["checked"] = sum(len(found) + len(bad) for found, bad in scans.values())
        progress.start("Verifying checkpoints", total=report["checked"])
        for run, (found, bad) in scans.items():
            _verify_run(run, found, bad, report, progress)
        progress.finish()
        for run in leftovers:
            report["incomplete"].append(_leftover(run, clean, run_is_active(run.name, root)))
        for run, (_, bad) in scans.items():
            damaged_stems = {d.path.stem for d in bad}
            active = run_is_active(run.name, root)
            report["incomplete"] += [_leftover(path, clean, active) for path in incomplete_files(run)
                                     if path.name.split(".")[0] not in damaged_stems]  # else reported as damaged
    report["cleaned_bytes"] = sum(e["bytes"] for e in report["incomplete"] if e["cleaned"])
    return report


def _verify_run(run: Path, found: list[Checkpoint], bad: list[Damage], report: dict[str, Any],
                progress: Progress) -> None:
    """Add one run's intact and damaged checkpoints, and its run.json and metrics problems, to ``report``."""
    try:
        read_run(run)
    except CorruptError as exc:
        report["damaged"].append({"path": str(run / "run.json"), "problem": str(exc)})
    report["damaged"] += [{"path": str(run / "metrics.jsonl"), "problem": p} for p in scan_metrics(run)[1]]
    for damage in bad:
        report["damaged"].append({"path": str(damage.path), "problem": damage.problem})
        progress.advance()
    for ckpt in found:
        problem = (_hash_problem(ckpt.weights_path, ckpt.sidecar["weights"], "weights")
                   or _hash_problem(ckpt.state_path, ckpt.sidecar.get("state"), "state"))
        if problem is None:
            report["ok"].append(ckpt.id)
        else:
            report["damaged"].append({"path": str(ckpt.sidecar_path), "problem": problem})
        progress.advance()


def _leftover(path: Path, clean: bool, active: bool) -> dict[str, Any]:
    """One incomplete file or run folder; ``clean`` removes it unless something may still be writing
    it: its run is training, or it is a temporary (or a folder) that changed within FRESH_TEMPORARY_S."""
    inside = [path, *path.iterdir()] if path.is_dir() else [path]
    fresh = (path.is_dir() or path.name.endswith(TMP_SUFFIX)) and recently_written(*inside)
    note = "run is training; left alone" if active else "may be a write in progress; left alone" if fresh else ""
    entry = {"path": str(path), "bytes": sum(p.stat().st_size for p in inside if p.is_file()), "cleaned": False,
             "note": note}
    if clean and not note:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        entry["cleaned"] = True
    return entry


def restore(ref: str | Path, *, name: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """An exported FILE is imported (a checkpoint as a new run, an ensemble as its members and a manifest
    called ``name``); a checkpoint id becomes its run's resume point."""
    if is_exported_file(ref):
        return import_exported(Path(str(ref)), name=name, root=root)
    if name is not None:
        raise BadInputError("--name names an ensemble imported from an exported file; a checkpoint id is "
                            "rolled back, not imported")
    return rollback(str(ref), root=root)


def rollback_plan(ref: str | Path, root: Path | None = None) -> dict[str, Any]:
    """What :func:`rollback` would do: the checkpoint, its run's current pointer, later checkpoints, and
    the damaged checkpoints ``best``/``latest``/a run id passed over (``warnings``)."""
    found = find_checkpoint(ref, root)
    ckpt = found.checkpoint
    if ckpt.state_path is None:
        how = "it was imported from an exported file" if ckpt.sidecar.get("imported") else "it has no training state"
        raise BadInputError(f"checkpoint {ckpt.id} cannot be resumed from ({how}); use it with explain or "
                            "evaluate, or as the start of a new training run")
    current = resume_point(ckpt.run_dir)
    later = [c.id for c in run_checkpoints(ckpt.run_dir) if c.epoch > ckpt.epoch]
    return {"action": "rollback", "id": ckpt.id, "run_id": ckpt.run_id, "epoch": ckpt.epoch,
            "previous": current.id if current else None, "later": later, "warnings": found.warnings}


def rollback(ref: str | Path, *, root: Path | None = None) -> dict[str, Any]:
    """Point the run's ``resume_from`` at ``ref``: ``dermcam train --resume`` continues after it.

    Later checkpoints of the run are not deleted: they stay until training rewrites those epochs.
    """
    plan = rollback_plan(ref, root)
    run_id = plan["run_id"]
    if run_is_active(run_id, root):
        raise LockedError(f"run {run_id} is training right now; stop it before changing its resume point")
    with store_lock("store", shared=True, root=root), store_lock(f"run-{run_id}", timeout=1.0, root=root):
        update_run(find_run(run_id, root), resume_from=plan["id"])
    return plan
