"""Issue #24: ``dermcam distill``'s ``--temperature`` and ``--alpha`` measured on validation, paired.

    python benchmarks/distill_defaults.py [--home /tmp/dermcam-cv] [--epochs 4] [--members 3]
        [--setting T:ALPHA ...] [--resamples 1000] [--smoke]

What it runs (the test split is not read by this script, and nothing it records comes from it):

1. ``dermcam prepare ../shared/data/ham10000-lite`` (seed 0, near-duplicates grouped), unless the store
   already holds it;
2. the teacher: ``--members`` runs on the **train split** (seeds 0, 1, ...), each with the options of the
   recipe's 4-epoch variant (benchmarks/accuracy_cv_ham10000_lite.py ``--epochs 4 --color-constancy
   none``: tf_efficientnet_lite0, 192x144, age, sex and site), validated and calibrated on val, made
   ``ensemble:distill-teacher`` with equal weights. Not the recipe's cross-validation: its folds trained
   on the val images, and a student imitating a teacher that has seen them would look better on val
   the more it imitates, which is the very setting measured here;
3. one student per ``--setting`` (default: 2:0.7, the literature's values and ``distill``'s defaults until
   this measurement, first; then 2:0 = the true labels only, i.e. no distillation, 1:0.7, 4:0.7, 2:0.3,
   2:1), each ``dermcam distill distill-teacher --temperature T
   --alpha ALPHA`` with the teacher's options (same backbone, size, epochs, seed 0, metadata);
4. every student's best checkpoint and the teacher predict the val split (calibrated, as ``evaluate``
   does); each row has balanced accuracy, melanoma recall, macro F1 and macro AUC with 95%
   lesion-bootstrap intervals, and the paired interval of its difference to the first setting (one
   draw of lesion groups, both models measured on every resample).

A finished run of exactly the configuration wanted is reused (teacher members and students), so an
interrupted benchmark continues where it stopped. Each run scores the test split at its end, as every
``dermcam train`` run does; this script does not read those numbers. The students' checkpoints are chosen
on val too, so their val numbers are a little optimistic, alike for every setting.
Results: benchmarks/results/distill_defaults.json, written after every student. ``--smoke``: a tiny
synthetic HAM10000 layout, tiny random model, two settings, in a temporary folder; writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import accuracy_cv_ham10000_lite as recipe
from _common import LITE, epoch_minutes, machine, report
from ablation_cv_fold import finished_run

METRICS = ("balanced_accuracy", "recall_mel", "macro_f1", "auc_macro")
DEFAULT_SETTINGS = ("2:0.7", "2:0", "1:0.7", "4:0.7", "2:0.3", "2:1")
TEACHER = "distill-teacher"


class DistillBenchError(SystemExit):
    """One line on stderr and exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"distill_defaults: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-cv"))
    parser.add_argument("--source", type=Path, default=LITE)
    parser.add_argument("--epochs", type=int, default=4, help="each teacher member's and each student's")
    parser.add_argument("--members", type=int, default=3, help="teacher members (seeds 0..N-1)")
    parser.add_argument("--setting", action="append", help="TEMPERATURE:ALPHA (repeatable); the first is the "
                                                           "reference of the paired differences")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and model; writes nothing")
    return parser


def parse_setting(text: str) -> tuple[float, float]:
    try:
        temperature, alpha = (float(part) for part in text.split(":"))
    except ValueError:
        raise DistillBenchError(f"--setting wants TEMPERATURE:ALPHA, such as 2:0.7, not '{text}'") from None
    return temperature, alpha


def main() -> None:
    args = build_parser().parse_args()
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            rargs = recipe.build_parser().parse_args(["--smoke"])
            recipe.smoke_setup(rargs, Path(tmp))
            args.home, args.source, args.members, args.resamples = rargs.home, rargs.source, 2, 50
            first = run(args, settings[:2], rargs)
            again = run(args, settings[:2], rargs)  # every run reused, the same numbers
            same = all(one["balanced_accuracy"] == two["balanced_accuracy"]
                       for one, two in zip(first["rows"], again["rows"]))
            if [r["trained"] for r in again["rows"]] != ["reused"] * len(again["rows"]) or not same:
                raise DistillBenchError("a second run trained again or measured differently")
        print(json.dumps(first, default=str))
        return
    rargs = recipe.build_parser().parse_args(["--epochs", str(args.epochs), "--color-constancy", "none"])
    run(args, settings, rargs, write=True)


def teacher_options(rargs: argparse.Namespace) -> dict[str, Any]:
    """One teacher member's ``dermcam train`` options: the recipe's fold options on the plain split."""
    options = recipe.train_options(rargs)
    del options["folds"]
    return options


def member(options: dict[str, Any], progress: Any) -> dict[str, Any]:
    """A teacher member: reused when the store has it finished, else trained now."""
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train_configurations

    wanted = dataclasses.asdict(TrainConfig.from_dict(options))
    info = finished_run(wanted)
    if info is not None:
        return {"run": info["run_id"], "best": info["best"], "trained": "reused"}
    [result] = train_configurations(options, progress=progress)
    return {"run": result.run_id, "best": result.best_id, "trained": "now"}


def teacher(members: list[dict[str, Any]], progress: Any) -> str:
    """``ensemble:distill-teacher`` of the members' best checkpoints (equal weights), made once."""
    from dermcam.errors import NotFoundError
    from dermcam.evaluate.ensemble import create_ensemble
    from dermcam.store.ensembles import read_ensemble

    wanted = sorted(m["best"] for m in members)
    try:
        have = sorted(m["id"] for m in read_ensemble(TEACHER).manifest["members"])
    except NotFoundError:
        create_ensemble(TEACHER, [m["best"] for m in members], progress=progress)
        return TEACHER
    if have != wanted:
        raise DistillBenchError(f"ensemble '{TEACHER}' in this store has other members ({', '.join(have)}) than "
                                f"the teacher runs ({', '.join(wanted)}): delete it or use another --home")
    return TEACHER


def student(options: dict[str, Any], setting: tuple[float, float], progress: Any) -> dict[str, Any]:
    """The student of one (temperature, alpha): reused when finished in the store, else distilled now."""
    from dermcam.store.ensembles import read_ensemble
    from dermcam.train.config import TrainConfig
    from dermcam.train.student import distill, student_defaults

    given = {key: options[key] for key in ("epochs", "seed", "patience", "lr", "batch_size", "freeze", "precision",
                                           "ema", "pretrained", "metadata")}
    given.update(distill_temperature=setting[0], distill_alpha=setting[1])
    ensemble = read_ensemble(TEACHER)
    config = {**student_defaults(ensemble, given, None), **given, "teacher": TEACHER, "dataset": options["dataset"]}
    info = finished_run(dataclasses.asdict(TrainConfig.from_dict(config)))
    if info is not None:
        return {"run": info["run_id"], "best": info["best"], "trained": "reused"}
    start = time.monotonic()
    result = distill(TEACHER, given, score_teacher=False, progress=progress).run
    return {"run": result.run_id, "best": result.best_id, "trained": "now",
            "wall_min": round((time.monotonic() - start) / 60, 2)}


def val_predictions(ref: str, progress: Any) -> tuple[list[str], np.ndarray, list[str]]:
    """Image ids, calibrated probabilities and classes of ``ref`` on the val split, as ``evaluate`` makes them."""
    import pandas as pd

    from dermcam.evaluate.evaluation import evaluate

    with tempfile.TemporaryDirectory() as out:
        result = evaluate(ref, split="val", resamples=0, out_dir=Path(out), progress=progress)
        frame = pd.read_csv(Path(out) / "predictions.csv", dtype={"image_id": str})
    return list(frame["image_id"]), frame[[f"p_{c}" for c in result.classes]].to_numpy(), result.classes


def run(args: argparse.Namespace, settings: list[tuple[float, float]], rargs: argparse.Namespace, *,
        write: bool = False) -> dict[str, Any]:
    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.evaluate.bootstrap import confidence_intervals, paired_intervals
    from dermcam.evaluate.evaluation import scored_split
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.progress import rich_progress
    from dermcam.store.references import resolve
    from dermcam.store.runs import find_run, read_metrics

    if len(set(settings)) != len(settings):
        raise DistillBenchError("a --setting is given twice")
    started, options = machine(), teacher_options(rargs)
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"options": options, "settings": [list(s) for s in settings], "test_split_read": False}
    with rich_progress() as progress:
        if not any(m["name"] == options["dataset"] for m in list_prepared()):
            prepare(args.source, name=options["dataset"], seed=0, progress=progress)
        members = [member({**options, "seed": seed}, progress) for seed in range(args.members)]
        name = teacher(members, progress)
        reference = resolve(members[0]["best"])
        split = scored_split(reference.sidecar, None, "val", None)
        ids = list(map(str, split.index["image_id"]))
        record.update(teacher={"id": f"ensemble:{name}", "members": members}, images=len(ids),
                      groups=len(set(map(str, split.groups))))
        base_probs: np.ndarray | None = None
        for position, setting in enumerate([None, *settings]):
            if setting is None:
                trained = "reused" if all(m["trained"] == "reused" for m in members) else "now"
                model: dict[str, Any] = {"setting": "teacher", "id": f"ensemble:{name}", "trained": trained}
            else:  # a student, distilled (or reused) now: the results grow one row at a time
                t, a = setting
                model = {"setting": f"T={t:g} alpha={a:g}", "temperature": t, "alpha": a,
                         **student(options, setting, progress)}
                model["id"] = model["best"]
            got_ids, probs, classes = val_predictions(model["id"], progress)
            if got_ids != ids:
                raise DistillBenchError(f"{model['setting']} predicted other val images than the teacher's split")
            metrics = compute_metrics(split.y_true, probs, classes)
            ci = confidence_intervals(split.y_true, probs, split.groups, classes, resamples=args.resamples).ci
            row: dict[str, Any] = dict(model)
            if position:
                run_dir = find_run(model["run"])
                row.update(epochs=len(read_metrics(run_dir)), best_epoch=int(str(model["best"]).rsplit(":", 1)[1]) + 1,
                           epoch_min=epoch_minutes(run_dir))
            for key in METRICS:
                row[key], row[f"{key}_ci"] = metrics.get(key), ci.get(key)
            if position == 1:
                base_probs, base_metrics = probs, metrics
            if position >= 2 and base_probs is not None:
                diff = paired_intervals(split.y_true, base_probs, probs, split.groups, classes,
                                        resamples=args.resamples).ci
                for key in METRICS:
                    row[f"d_{key}"] = round(float(metrics[key]) - float(base_metrics[key]), 6)
                    row[f"d_{key}_ci"] = diff.get(key)
            rows.append(row)
            if write:
                report("distill_defaults", rows, {**record, "machine_at_start": started})
    return {"rows": rows, **record}


if __name__ == "__main__":
    main()
