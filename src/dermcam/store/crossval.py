"""Cross-validations in the store: ``crossval/<name>/cv.json`` (the record) and ``oof.csv`` (out-of-fold
predictions).

The record says what was cross-validated (K, seed, data set name and fingerprint, the configuration
every fold run shares), which run trains each fold (ids chosen before the first fold starts, so a fold
interrupted at any moment is found again) and how far each got, the out-of-fold predictions file, the
metrics measured on them and the ensemble of the folds' best checkpoints. ``oof.csv`` has one row per
train+val image of a finished fold: its cache row, fold, run, checkpoint, group, label and the
calibrated probability of each class.

Both are written atomically and validated when read, like every store document: a damaged record is
one CorruptError line (exit 4), and what it names is a run id, a checkpoint id or a file name inside
its own folder, never a path, so no record leads a command outside the store. Training
(:mod:`dermcam.train.crossval`) fills it in; :mod:`dermcam.evaluate.crossval` measures the predictions.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store import schema as s
from dermcam.store.checkpoint import read_json_document
from dermcam.store.files import atomic_write_bytes, atomic_write_json, utc_now
from dermcam.store.paths import PLAIN_NAME, contained, crossval_dir

CV_SCHEMA = "dermcam.crossval/1"
PREFIX = "cv:"  # how a user names a cross-validation: dermcam evaluate cv:NAME, dermcam train --resume --run cv:NAME
RECORD_FILE = "cv.json"
OOF_FILE = "oof.csv"
FOLD_STATUSES = ("pending", "training", "finished")
OOF_COLUMNS = ("image_id", "row", "fold", "run", "checkpoint", "group", "label")  # then p_<class> per class

FOLD_RUN = s.obj({
    "fold": s.integer(0, 99),
    "run": s.NAME,
    "status": s.one_of(*FOLD_STATUSES),
}, optional={"best": s.nullable(s.CHECKPOINT_ID), "images": s.integer(), "groups": s.integer()})


def _consistent(value: Any, field: str) -> None:
    """Fold i is entry i, each fold has its own run, a best checkpoint belongs to its fold's run, and a
    finished record has every fold finished and its predictions file."""
    runs = value["fold_runs"]
    if len(runs) != value["folds"]:
        raise s.Invalid("fold_runs", f"does not have {value['folds']} entries")
    if len({r["run"] for r in runs}) != len(runs):
        raise s.Invalid("fold_runs", "names one run for two folds")
    for i, entry in enumerate(runs):
        where = f"fold_runs[{i}]"
        if entry["fold"] != i:
            raise s.Invalid(f"{where}.fold", f"is not {i}")
        best = entry.get("best")
        if best is not None and best.rpartition(":")[0] != entry["run"]:
            raise s.Invalid(f"{where}.best", f"is not a checkpoint of run {entry['run']}")
        if entry["status"] == "finished" and best is None:
            raise s.Invalid(f"{where}.best", "is missing for a finished fold")
    if value["status"] == "finished" and (any(r["status"] != "finished" for r in runs) or not value.get("oof_file")):
        raise s.Invalid("status", "is finished while a fold or the predictions file is not")


RECORD = s.all_of(s.obj({
    "schema": s.one_of(CV_SCHEMA),
    "name": s.NAME,
    "created": s.TIMESTAMP,
    "status": s.one_of("running", "finished"),
    "folds": s.integer(2, 20),
    "seed": s.integer(0, 2**63),
    "dataset": s.obj({"name": s.NAME, "fingerprint": s.text(min_len=1, max_len=200)}),
    "classes": s.CLASSES,
    "config": s.CONFIG,
    "fold_runs": s.array(FOLD_RUN, min_len=2, max_len=20),
}, optional={
    "images": s.integer(),
    "groups": s.integer(),
    "oof_file": s.nullable(s.NAME),
    "metrics": s.nullable(s.obj()),
    "ensemble": s.nullable(s.NAME),
    "updated": s.TIMESTAMP,
}), _consistent)


@dataclass(frozen=True)
class CrossValidation:
    """A validated record and where it lies."""

    path: Path  # crossval/<name>/cv.json
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def finished(self) -> bool:
        return self.record["status"] == "finished"

    def unfinished_folds(self) -> list[int]:
        return [r["fold"] for r in self.record["fold_runs"] if r["status"] != "finished"]


def missing_folds(cv: CrossValidation) -> str:
    """The unfinished folds, numbered as the training log and ``evaluate cv:NAME`` number them (from 1):
    ``fold 2 (run abc123, training), fold 3 (run def456, pending)``."""
    return ", ".join(f"fold {r['fold'] + 1} (run {r['run']}, {r['status']})"
                     for r in cv.record["fold_runs"] if r["status"] != "finished")


def cv_name(ref: object) -> str | None:
    """The cross-validation a reference names (``cv:NAME``), else None."""
    text = str(ref) if isinstance(ref, str) else ""
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


def record_path(name: str, root: Path | None = None) -> Path:
    """``crossval/<name>/cv.json``; a name that is not plain is bad input, a folder leading out damage."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise BadInputError(f"cross-validation name {name!r} is not a plain name (letters, digits, . _ + -)")
    return contained(crossval_dir(root), name, "cross-validation", CorruptError) / RECORD_FILE


def check_new_cv_name(name: str, root: Path | None = None) -> None:
    """Refuse, before any work, a name a cross-validation already has."""
    if record_path(name, root).parent.exists():
        raise BadInputError(f"cross-validation '{name}' exists (dermcam evaluate cv:{name}); choose another "
                            "--ensemble NAME, or continue it with: dermcam train --resume --run cv:" + name)


def list_names(root: Path | None = None) -> list[str]:
    base = crossval_dir(root)
    return sorted(p.name for p in base.iterdir() if PLAIN_NAME.fullmatch(p.name)) if base.is_dir() else []


def read_cv(name: str, root: Path | None = None) -> CrossValidation:
    """A stored cross-validation, validated: NotFoundError (listing the others) or CorruptError."""
    path = record_path(name, root)
    if not path.is_file():
        known = ", ".join(f"cv:{n}" for n in list_names(root)) or "none; run one with: dermcam train --folds K"
        raise NotFoundError(f"no cross-validation cv:{name} in {crossval_dir(root)} (there are: {known})")
    record = read_json_document(path, RECORD, "cross-validation record")
    if record["name"] != name:
        raise CorruptError(f"{path} names cross-validation '{record['name']}', not '{name}' (damaged or modified)")
    return CrossValidation(path, record)


def create_cv(record: dict[str, Any], root: Path | None = None) -> CrossValidation:
    """Write a new record (its folder must not exist yet: two cross-validations never share a name)."""
    path = record_path(record["name"], root)
    s.validate(record, RECORD, f"{path}: new cross-validation record")
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.parent.mkdir()
    except FileExistsError:
        raise BadInputError(f"cross-validation '{record['name']}' exists; choose another name") from None
    atomic_write_json(path, record)
    return CrossValidation(path, record)


def update_cv(cv: CrossValidation, **fields: Any) -> CrossValidation:
    """Change fields of the record as it is on disk now; validated like a read one before it is written."""
    record = {**_reread(cv).record, **fields, "updated": utc_now()}
    s.validate(record, RECORD, f"{cv.path}: updated cross-validation record")
    atomic_write_json(cv.path, record)
    return CrossValidation(cv.path, record)


def _reread(cv: CrossValidation) -> CrossValidation:
    """The record as it is on disk now, validated (another process may have advanced it)."""
    record = read_json_document(cv.path, RECORD, "cross-validation record")
    if record["name"] != cv.name:
        raise CorruptError(f"{cv.path} names cross-validation '{record['name']}', not '{cv.name}' "
                           "(damaged or modified)")
    return CrossValidation(cv.path, record)


def set_fold(cv: CrossValidation, fold: int, **fields: Any) -> CrossValidation:
    """Change fields of one fold's entry (``status``, ``best``, ``images``, ``groups``)."""
    runs = [dict(r) for r in _reread(cv).record["fold_runs"]]
    runs[fold].update(fields)
    return update_cv(cv, fold_runs=runs)


def cv_of_run(run_id: str, root: Path | None = None) -> CrossValidation | None:
    """The cross-validation whose record names ``run_id`` as one of its fold runs, or None. A damaged
    record could be the one: then CorruptError, since continuing without it would skip its folds."""
    damaged: list[str] = []
    for name in list_names(root):
        try:
            cv = read_cv(name, root)
        except NotFoundError:
            continue  # a folder without a record: a creation that was cut short before the record was written
        except CorruptError as exc:
            damaged.append(str(exc))
            continue
        if any(r["run"] == run_id for r in cv.record["fold_runs"]):
            return cv
    if damaged:
        raise CorruptError(f"run {run_id} is a cross-validation fold and a record that may be its own is "
                           f"damaged: {damaged[0]}")
    return None


# -- what a record needs from the rest of the store: prune protection and verify ---------------------


@dataclass(frozen=True)
class DamagedCV:
    path: Path
    problem: str


def scan_cvs(root: Path | None = None) -> tuple[list[CrossValidation], list[DamagedCV]]:
    """Every readable record and every one that is not (listed, never followed). A folder without a
    record is neither: a creation cut short before its record was written names nothing."""
    found: list[CrossValidation] = []
    damaged: list[DamagedCV] = []
    for name in list_names(root):
        try:
            found.append(read_cv(name, root))
        except NotFoundError:
            continue
        except CorruptError as exc:
            damaged.append(DamagedCV(crossval_dir(root) / name / RECORD_FILE, str(exc)))
    return found, damaged


def folds_in_use(root: Path | None = None) -> dict[str, list[str]]:
    """Checkpoint id -> the cross-validations that need it, as :func:`dermcam.store.ensembles.members_in_use`
    says it for ensembles (``ckpt prune`` asks both): every fold's best once the record names it (its
    out-of-fold predictions came from it, and the folds' ensemble is made of them), and, for a fold whose
    training ended but whose predictions are not stored yet, the best its run finished with (what the
    record is about to name). A damaged record protects nothing it cannot name; prune refuses it."""
    from dermcam.store.paths import runs_dir
    from dermcam.store.runs import read_run

    used: dict[str, list[str]] = {}
    for cv in scan_cvs(root)[0]:
        needed = {entry["best"] for entry in cv.record["fold_runs"] if entry.get("best")}
        for entry in cv.record["fold_runs"]:
            if entry["status"] != "training" or entry.get("best"):
                continue
            try:
                info = read_run(contained(runs_dir(root), entry["run"], "run folder", CorruptError))
            except (CorruptError, NotFoundError, OSError):
                continue  # not created yet, or damaged: ckpt verify reports the run's own damage
            else:
                if info.get("status") == "finished" and info.get("best"):
                    needed.add(info["best"])
        for ckpt_id in sorted(needed):
            used.setdefault(ckpt_id, []).append(cv.name)
    return used


def check_cv(cv: CrossValidation, root: Path | None = None) -> None:
    """What ``ckpt verify`` checks of a readable record beyond its schema, one CorruptError line at the
    first problem: every fold that started has its run, and that run (and its best checkpoint) is that
    fold of K on the record's classes; the predictions file reads (:func:`read_oof`), exists once a
    fold finished, and holds as many images and groups per finished fold (and in all, once finished)
    as the record says. A best checkpoint deleted on purpose (``prune --force``) is not damage, as for an
    ensemble's member: the predictions stay."""
    from dermcam.store.paths import runs_dir
    from dermcam.store.references import resolve
    from dermcam.store.runs import read_run

    record = cv.record
    folds = record["folds"]

    def damaged(why: str) -> CorruptError:
        return CorruptError(f"cross-validation '{cv.name}' ({cv.path}): {why} (damaged or modified)")

    for entry in record["fold_runs"]:
        fold, run = entry["fold"], entry["run"]
        run_dir = contained(runs_dir(root), run, "run folder", CorruptError)
        if entry["status"] == "finished" and not (run_dir / "run.json").is_file():
            raise damaged(f"fold {fold + 1} is finished but its run {run} does not exist")
        if entry["status"] == "pending" or not (run_dir / "run.json").is_file():
            continue  # not started, or killed before its run was created: the next resume creates it
        try:
            config = read_run(run_dir)["config"]
        except CorruptError:
            continue  # reported by ckpt verify as the run's own damage
        if config.get("folds") != folds or config.get("fold") != fold:
            raise damaged(f"run {run} is not fold {fold + 1} of {folds}")
        if not entry.get("best"):
            continue
        try:
            ckpt = resolve(entry["best"], root)
        except (NotFoundError, CorruptError):
            continue  # deleted on purpose (prune --force), or reported by ckpt verify as its own damage
        side, made = ckpt.sidecar, ckpt.sidecar.get("config") or {}
        if (made.get("folds"), made.get("fold")) != (folds, fold) or list(side["classes"]) != list(record["classes"]):
            raise damaged(f"checkpoint {ckpt.id} is not the model of fold {fold + 1} of {folds} for classes "
                          f"{', '.join(record['classes'])}")
    path = oof_path(cv)
    if (path is None or not path.is_file()) and not any(r["status"] == "finished" for r in record["fold_runs"]):
        return  # nothing predicted yet
    oof = read_oof(cv)  # a finished fold without the file: CorruptError
    for entry in record["fold_runs"]:
        if entry["status"] != "finished":
            continue
        mine = oof.fold == entry["fold"]
        images, groups = int(mine.sum()), len(set(map(str, oof.group[mine])))
        if "images" in entry and images != entry["images"] or "groups" in entry and groups != entry["groups"]:
            raise damaged(f"{OOF_FILE} holds {images} images in {groups} groups of fold {entry['fold'] + 1}, the "
                          f"record says {entry.get('images')} in {entry.get('groups')}")
    if cv.finished and "images" in record and len(oof) != record["images"]:
        raise damaged(f"{OOF_FILE} holds {len(oof)} images, the finished record says {record['images']}")


def unusable_cvs(root: Path | None = None) -> list[DamagedCV]:
    """Every cross-validation record that is damaged, itself or in what it names (:func:`check_cv`)."""
    found, damaged = scan_cvs(root)
    for cv in found:
        try:
            check_cv(cv, root)
        except (CorruptError, NotFoundError) as exc:
            damaged.append(DamagedCV(cv.path, str(exc)))
    return damaged


# -- out-of-fold predictions ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold predictions: one entry per image of the finished folds."""

    image_id: list[str]
    row: np.ndarray  # cache rows of the data set
    fold: np.ndarray
    run: list[str]
    checkpoint: list[str]
    group: np.ndarray  # object array of group keys (what the bootstrap resamples)
    label: np.ndarray  # integer labels in the record's class order
    probs: np.ndarray  # (N, K) calibrated probabilities

    def __len__(self) -> int:
        return len(self.row)


def oof_path(cv: CrossValidation) -> Path | None:
    """The record's predictions file, inside its own folder (a name, never a path), or None."""
    name = cv.record.get("oof_file")
    return None if name is None else contained(cv.folder, name, "out-of-fold predictions file", CorruptError)


def write_oof(cv: CrossValidation, oof: OutOfFold) -> Path:
    """Write the predictions atomically as ``oof.csv`` (probabilities written exactly: ``repr`` of each float)."""
    classes = list(cv.record["classes"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*OOF_COLUMNS, *(f"p_{c}" for c in classes)])
    for i in range(len(oof)):
        writer.writerow([oof.image_id[i], int(oof.row[i]), int(oof.fold[i]), oof.run[i], oof.checkpoint[i],
                         str(oof.group[i]), int(oof.label[i]), *(repr(float(p)) for p in oof.probs[i])])
    path = contained(cv.folder, OOF_FILE, "out-of-fold predictions file", CorruptError)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


def read_oof(cv: CrossValidation) -> OutOfFold:
    """The record's predictions, every field checked (a damaged file is one CorruptError line): the
    header, whole numbers, folds and runs that match the record, a row never listed twice, labels of
    the record's classes, and probabilities that are finite, in [0, 1] and sum to 1."""
    path = oof_path(cv)
    if path is None or not path.is_file():
        done = [r["fold"] + 1 for r in cv.record["fold_runs"] if r["status"] == "finished"]
        if done:  # a fold is marked finished only after its predictions were written
            raise CorruptError(f"cross-validation '{cv.name}' ({cv.path}): fold {done[0]} is finished but its "
                               f"out-of-fold predictions file {cv.record.get('oof_file') or OOF_FILE} is missing "
                               "(damaged or modified)")
        raise NotFoundError(f"cross-validation '{cv.name}' has no out-of-fold predictions yet: none of its "
                            f"{cv.record['folds']} folds finished ({missing_folds(cv)}); continue it with: "
                            f"dermcam train --resume --run cv:{cv.name}")
    classes = list(cv.record["classes"])
    header = [*OOF_COLUMNS, *(f"p_{c}" for c in classes)]
    runs = {r["fold"]: r for r in cv.record["fold_runs"]}

    def bad(line: int, why: str) -> CorruptError:
        return CorruptError(f"{path} line {line}: {why} (damaged or modified)")

    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CorruptError(f"{path} is not readable ({exc}) (damaged or modified)") from None
    if not lines or lines[0] != header:
        raise bad(1, "the header is not " + ",".join(header))
    ids, rows, folds, run_ids, ckpts, groups, labels, probs = [], [], [], [], [], [], [], []
    for number, fields in enumerate(lines[1:], 2):
        if len(fields) != len(header):
            raise bad(number, f"has {len(fields)} fields, not {len(header)}")
        image_id, row, fold, run, ckpt, group, label, *values = fields
        try:
            row_i, fold_i, label_i = int(row), int(fold), int(label)
            p = [float(v) for v in values]
        except ValueError:
            raise bad(number, "a number is not a number") from None
        entry = runs.get(fold_i)
        if entry is None or entry["run"] != run or entry.get("best") != ckpt:
            raise bad(number, f"fold {fold} of run {run} ({ckpt}) is not a fold of the record")
        if row_i < 0 or not 0 <= label_i < len(classes) or not image_id or not group:
            raise bad(number, "a row, label, image id or group is out of range")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in p) or abs(sum(p) - 1.0) > 1e-4:
            raise bad(number, "the probabilities are not finite numbers in [0, 1] summing to 1")
        ids.append(image_id)
        rows.append(row_i)
        folds.append(fold_i)
        run_ids.append(run)
        ckpts.append(ckpt)
        groups.append(group)
        labels.append(label_i)
        probs.append(p)
    if len(set(rows)) != len(rows):
        raise CorruptError(f"{path} lists an image twice (damaged or modified)")
    return OutOfFold(ids, np.asarray(rows, dtype=np.int64), np.asarray(folds, dtype=np.int64), run_ids, ckpts,
                     np.asarray(groups, dtype=object), np.asarray(labels, dtype=np.int64),
                     np.asarray(probs, dtype=np.float64).reshape(-1, len(classes)))


def merge_oof(parts: Sequence[OutOfFold], classes: int) -> OutOfFold:
    """Several folds' predictions as one table, ordered by cache row."""
    if not parts:
        return OutOfFold([], np.zeros(0, np.int64), np.zeros(0, np.int64), [], [], np.zeros(0, object),
                         np.zeros(0, np.int64), np.zeros((0, classes)))
    order = np.argsort(np.concatenate([p.row for p in parts]), kind="stable")

    def joined(name: str) -> Any:
        values = [getattr(p, name) for p in parts]
        if isinstance(values[0], list):
            flat = [v for part in values for v in part]
            return [flat[i] for i in order]
        return np.concatenate(values)[order]

    return OutOfFold(*(joined(n) for n in ("image_id", "row", "fold", "run", "checkpoint", "group", "label",
                                           "probs")))


def without_fold(oof: OutOfFold, fold: int) -> OutOfFold:
    """The predictions of every fold but ``fold`` (before that fold's are written again)."""
    keep = np.flatnonzero(oof.fold != fold)
    return OutOfFold([oof.image_id[i] for i in keep], oof.row[keep], oof.fold[keep], [oof.run[i] for i in keep],
                     [oof.checkpoint[i] for i in keep], oof.group[keep], oof.label[keep], oof.probs[keep])
