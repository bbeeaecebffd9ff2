"""Issue #24's recipe as one command: a cross-validated ensemble and one distilled model on ham10000-lite.

    python benchmarks/accuracy_cv_ham10000_lite.py [--folds 5] [--backbone tf_efficientnet_lite0]
        [--image-size 192x144] [--precision fp32] [--epochs 8] [--freeze 2] [--ema] [--metadata age,sex,site]
        [--color-constancy shades-of-gray] [--student-epochs 8] [--student-metadata FIELDS] [--student-alpha 0.7]
        [--no-student]
        [--tag TAG] [--smoke]

What it runs, in this order, so that every choice is made before the test split is read:

1. ``dermcam prepare ../shared/data/ham10000-lite`` (seed 0; near-duplicates grouped) into a store of its
   own (``--home``, default /tmp/dermcam-cv), unless that store already holds it;
2. ``dermcam train --folds K ... --ensemble NAME``: K fold runs over train+val, each validated, stopped
   and calibrated on its held-out fold; the out-of-fold estimate over every train+val image
   (``dermcam evaluate cv:NAME``), with lesion-bootstrap intervals;
3. ``dermcam distill NAME``: one student (the first member's backbone and input size, images only
   unless ``--student-metadata``) on the ensemble's calibrated probabilities; its run scores it on test
   at the end, as every run does;
4. the test split, read once per model: the CV ensemble (its headline: argmax of the mean calibrated
   probabilities), the same with four-flip TTA (an ablation row, not a choice), each fold's model
   alone (the single-model rows), with 95% lesion-bootstrap intervals.

Times are wall-clock minutes per stage, measured in this process (a resumed recipe's count only what
this process ran), and ``epoch_minutes``: every fold run's and the student's recorded epoch times, read
from the store; run it alone (check ``uptime``).
Results: benchmarks/results/accuracy_cv_ham10000_lite[_TAG].json. ``--smoke`` runs every step on a tiny
synthetic HAM10000 layout with a tiny random model in a temporary folder and writes nothing (the test
suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import LITE, epoch_minutes, machine, peak_rss_mib, report

HEADLINE = ("balanced_accuracy", "recall_mel", "macro_f1", "auc_macro", "accuracy")


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics and their 95% intervals (None where a metric was not measured)."""
    ci = (metrics.get("ci") or {}).get("intervals") or {}
    out: dict[str, Any] = {}
    for key in HEADLINE:
        out[key] = metrics.get(key)
        out[f"{key}_ci"] = ci.get(key)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options and their defaults (benchmarks/ablation_cv_fold.py reads them too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-cv"))
    parser.add_argument("--source", type=Path, default=LITE)
    parser.add_argument("--name", default="cv-lite", help="the cross-validation and its ensemble")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", default="192x144")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32",
                        help="fp32: faster than bf16 for EfficientNet-Lite0 training even on an AMX CPU "
                             "(docs/models.md); 'auto' for dermcam's own choice")
    parser.add_argument("--freeze", type=int, default=2)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--metadata", default="age,sex,site", help="'' for images only")
    parser.add_argument("--color-constancy", default="shades-of-gray")
    parser.add_argument("--student-epochs", type=int, default=8)
    parser.add_argument("--student-metadata", default="",
                        help="fields the student reads (distill --metadata); '' (the measured recipe's "
                             "default) for images only; age,sex,site brought the student within 0.01 of its "
                             "teacher (docs/results.md)")
    parser.add_argument("--student-alpha", type=float, default=0.7,
                        help="the student's distillation weight (distill --alpha): 0.7, the measured recipe's; "
                             "distill's default is now 0.3, chosen on val after the recipe ran (docs/results.md)")
    parser.add_argument("--no-student", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the results file, for ablation runs")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and model; writes nothing")
    return parser


def smoke_setup(args: argparse.Namespace, tmp: Path) -> None:
    """``--smoke``: a tiny synthetic HAM10000 layout in ``tmp``, a store beside it, a tiny random model."""
    args.home = Path(tmp) / "home"
    args.source = Path(tmp) / "src"
    from dermcam.data.synthetic import write_synthetic_ham10000

    write_synthetic_ham10000(args.source, n_lesions_per_class=12)
    args.backbone, args.image_size, args.epochs, args.student_epochs = "test_efficientnet", "48x36", 1, 1
    args.folds, args.freeze, args.batch_size = 2, 0, 8


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``dermcam train --folds K`` options of the recipe's cross-validation."""
    return {
        "dataset": "ham10000-lite", "backbone": args.backbone, "pretrained": "none" if args.smoke else "auto",
        "image_size": args.image_size, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "precision": args.precision, "freeze": args.freeze, "ema": args.ema, "seed": args.seed, "patience": 99,
        "folds": args.folds,
        "color_constancy": args.color_constancy, "metadata": args.metadata or None,
    }


def main() -> None:
    args = build_parser().parse_args()

    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            smoke_setup(args, Path(tmp))
            record = run(args)
        print(json.dumps(record, default=str))
        return
    record = run(args)
    name = "accuracy_cv_ham10000_lite" + (f"_{args.tag}" if args.tag else "")
    report(name, record["rows"], {key: value for key, value in record.items() if key != "rows"})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe, stage by stage; returns the rows (one per model scored on test) and the stages' times."""
    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.evaluate.crossval import cv_estimate
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress
    from dermcam.store.crossval import list_names
    from dermcam.train.crossval import continue_cross_validation, train_or_cross_validate
    from dermcam.train.student import distill

    minutes: dict[str, float] = {}
    options = train_options(args)
    rows: list[dict[str, Any]] = []
    with rich_progress() as progress:
        start = time.monotonic()
        if not any(m["name"] == "ham10000-lite" for m in list_prepared()):
            prepare(args.source, name="ham10000-lite", seed=0, progress=progress)
        minutes["prepare"] = (time.monotonic() - start) / 60

        start = time.monotonic()
        if args.name in list_names():  # a killed recipe continues where it stopped (exact resume per fold)
            cv = continue_cross_validation(args.name, progress=progress)
        else:
            cv = train_or_cross_validate(options, cv_name=args.name, progress=progress)
        minutes["cross_validation"] = (time.monotonic() - start) / 60
        oof = cv_estimate(args.name)

        student = None
        if not args.no_student:
            start = time.monotonic()
            student = distill(args.name, {"epochs": args.student_epochs, "seed": args.seed, "patience": 99,
                                          "lr": args.lr, "batch_size": args.batch_size, "freeze": args.freeze,
                                          "precision": options["precision"], "ema": args.ema,
                                          "pretrained": options["pretrained"], "distill_alpha": args.student_alpha,
                                          **({"metadata": args.student_metadata} if args.student_metadata else {})},
                              score_teacher=False, progress=progress)  # the teacher's test row is below
            minutes["distillation"] = (time.monotonic() - start) / 60

        # The test split, once per model, after every choice above.
        start = time.monotonic()
        ensemble = f"ensemble:{args.name}"
        rows.append({"model": f"CV ensemble ({args.folds} folds)", "id": ensemble,
                     **summary(evaluate(ensemble, split="test", progress=progress).metrics)})
        rows.append({"model": f"CV ensemble ({args.folds} folds) + TTA", "id": ensemble,
                     **summary(evaluate(ensemble, split="test", tta=True, progress=progress).metrics)})
        if student is not None and student.run.test_metrics:  # scored on test by its own run's end
            rows.append({"model": "distilled student", "id": student.run.best_id,
                         **summary(student.run.test_metrics)})
        for fold, info in enumerate(cv.record["fold_runs"] if hasattr(cv, "record") else []):
            best = info.get("best")
            if best:
                rows.append({"model": f"fold {fold} model alone", "id": best,
                             **summary(evaluate(best, split="test", progress=progress).metrics)})
        minutes["test_scoring"] = (time.monotonic() - start) / 60
    minutes["training_total"] = minutes["cross_validation"] + minutes.get("distillation", 0.0)
    return {"rows": rows, "epoch_minutes": run_epoch_minutes(cv, student), "oof": {"images": oof.images, "groups": oof.groups, **summary(oof.metrics)},
            "minutes": {k: round(v, 2) for k, v in minutes.items()}, "config": {**vars(args), "home": str(args.home),
                                                                               "source": str(args.source)},
            "options": options, "peak_rss_mib": peak_rss_mib(), "machine_at_start": machine()}


def run_epoch_minutes(cv: Any, student: Any) -> dict[str, float]:
    """Each fold run's and the student's recorded epoch minutes (training and validation), read from the
    store: a resumed recipe's ``minutes`` count only what this process ran, these count every epoch."""
    from dermcam.store.runs import find_run

    out = {f"fold {info['fold']} ({info['run']})": epoch_minutes(find_run(info["run"]))
           for info in (cv.record["fold_runs"] if hasattr(cv, "record") else [])}
    if student is not None:
        out["student"] = epoch_minutes(student.run.run_dir)
    return out


if __name__ == "__main__":
    main()
