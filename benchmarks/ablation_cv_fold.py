"""Issue #24's ablation: do patient metadata and colour constancy help the recipe? Fold 0, paired intervals.

    python benchmarks/ablation_cv_fold.py [--home /tmp/dermcam-cv] [--name cv-lite]
        [--variant no-metadata] [--variant no-color-constancy] [--resamples 1000] [--device auto]
        [--tag TAG] [--fallback-defaults] [--smoke]

Run it after benchmarks/accuracy_cv_ham10000_lite.py, on the same store (``--home``) and with the same
``--name`` and ``--tag``. The recipe's ensemble, TTA, student and single-fold rows come from the recipe
itself; the metadata and colour-constancy rows need training runs of their own, and this script makes
them, comparing on validation only, so the test split stays read once (by the recipe):

1. the recipe's configuration is read from its cross-validation record in the store (``cv:NAME``: the
   exact configuration every fold ran with, which the recipe's results JSON only summarises); the
   fold-0 run's own configuration and, when it names this store, the results JSON's ``options`` must
   agree with it. ``--fallback-defaults``: a store without the record trains with the recipe's default
   options instead, and then trains the full recipe's fold 0 as well;
2. fold 0 of the same K-fold split is trained once per ``--variant`` (default: both), i.e. the same
   configuration with ``metadata`` None (``no-metadata``) or ``color_constancy`` none
   (``no-color-constancy``). A finished run of exactly that configuration already in the store is
   reused, so an interrupted ablation continues where it stopped. The recipe's own fold-0 run is the
   "full recipe" row; it is never trained again;
3. every model predicts fold 0's held-out images with the function that made the recipe's out-of-fold
   predictions (:func:`dermcam.evaluate.crossval.fold_predictions`: the best checkpoint, calibrated on
   that fold). The script fails unless every model predicted the same image ids, and unless they are
   the recipe's stored fold-0 rows;
4. each row has balanced accuracy, melanoma recall, macro F1 and macro AUC with 95% lesion-bootstrap
   intervals, and the paired interval of its difference to the full recipe (one draw of lesion groups,
   both models measured on each resample: :func:`dermcam.evaluate.bootstrap.paired_intervals`). A
   difference interval that excludes 0 says the ablated part matters on this fold; one fold of about
   1,300 images and one seed cannot show small gains.

Times: ``epoch_min`` is the sum of a run's recorded epoch times (training and validation, also for the
reused recipe run), ``wall_min`` the wall-clock minutes this process spent training it (None when
reused). Results: benchmarks/results/ablation_cv_fold[_TAG].json. ``--smoke`` cross-validates a tiny
random model on a tiny synthetic HAM10000 layout in a temporary folder (the recipe's smoke settings),
ablates it, runs the ablation again to check that every run is reused, and writes nothing.
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
from _common import LITE, RESULTS, epoch_minutes, machine, peak_rss_mib, report

METRICS = ("balanced_accuracy", "recall_mel", "macro_f1", "auc_macro")
# What each variant changes in the recipe's configuration.
VARIANTS: dict[str, dict[str, Any]] = {"no-metadata": {"metadata": None},
                                       "no-color-constancy": {"color_constancy": "none"}}
FULL = "full recipe"


class AblationError(SystemExit):
    """One line on stderr and exit 1: the comparison would not be what it claims to be."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ablation_cv_fold: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-cv"), help="the recipe's store")
    parser.add_argument("--name", default="cv-lite", help="the recipe's cross-validation (its --name)")
    parser.add_argument("--source", type=Path, default=LITE, help="prepared from here with --fallback-defaults")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="a part to leave out (repeatable; default: every one)")
    parser.add_argument("--resamples", type=int, default=1000, help="lesion-bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="where to train and predict (default: the recipe's)")
    parser.add_argument("--tag", default="", help="the recipe's --tag: its results JSON and this one's suffix")
    parser.add_argument("--fallback-defaults", action="store_true",
                        help="no cv:NAME in the store: use the recipe's default options, train its fold 0 too")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data and model; writes nothing")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not 1 <= args.resamples <= 100_000:
        raise AblationError("--resamples must be from 1 to 100000")
    if args.smoke:
        print(json.dumps(smoke(args), default=str))
        return
    record = run(args)
    name = "ablation_cv_fold" + (f"_{args.tag}" if args.tag else "")
    report(name, record.pop("rows"), record)


def smoke(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's smoke cross-validation in a temporary folder, the ablation, and the ablation again
    (every run reused, the same numbers)."""
    with tempfile.TemporaryDirectory() as tmp:
        rargs = recipe.build_parser().parse_args(["--smoke"])
        recipe.smoke_setup(rargs, Path(tmp))
        os.environ["DERMCAM_HOME"] = str(rargs.home)
        from dermcam.data.prepare import prepare
        from dermcam.train.crossval import train_or_cross_validate

        prepare(rargs.source, name="ham10000-lite", seed=0)
        train_or_cross_validate(recipe.train_options(rargs), cv_name=rargs.name)
        args.home, args.name, args.resamples = rargs.home, rargs.name, min(args.resamples, 200)
        first = run(args, results=None)
        again = run(args, results=None)
        if [r["trained"] for r in again["rows"]] != ["recipe (reused)"] + ["reused"] * len(args.variant):
            raise AblationError(f"a second ablation trained again: {[r['trained'] for r in again['rows']]}")
        for one, two in zip(first["rows"], again["rows"]):
            if any(one[k] != two[k] for k in ("run", "best", *METRICS)):
                raise AblationError(f"a second ablation measured {one['variant']} differently")
    return first


def run(args: argparse.Namespace, results: Path | None | bool = True) -> dict[str, Any]:
    """Read the recipe, train (or reuse) the variants' fold-0 runs, score all on fold 0's held-out images.
    ``results``: the recipe's results JSON to check the options against (True: the one ``--tag`` names)."""
    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared, load_prepared
    from dermcam.data.folds import fold_assignment
    from dermcam.errors import NotFoundError
    from dermcam.evaluate.crossval import fold_predictions
    from dermcam.progress import rich_progress
    from dermcam.store.crossval import CrossValidation, read_cv, read_oof
    from dermcam.store.references import resolve

    started, clock = machine(), time.monotonic()
    args.variant = list(dict.fromkeys(args.variant or VARIANTS))  # default: every part, each once
    notes: list[str] = []
    try:
        cv = read_cv(args.name)
    except NotFoundError as exc:
        if not args.fallback_defaults:
            raise AblationError(f"{exc}. Run benchmarks/accuracy_cv_ham10000_lite.py first (same --home and "
                                "--name), or pass --fallback-defaults to train its fold 0 here too") from None
        cv = None
    with rich_progress() as progress:
        if cv is not None:
            config, full_run = recipe_config(cv)
            source = f"cross-validation record cv:{cv.name}"
            if results is True:
                results = RESULTS / ("accuracy_cv_ham10000_lite" + (f"_{args.tag}" if args.tag else "") + ".json")
            if isinstance(results, Path):
                notes.append(check_recipe_results(results, args.home, args.name, config))
        else:
            rargs = recipe.build_parser().parse_args([])
            config = default_config(recipe.train_options(rargs))
            full_run = None
            source = "the recipe's default options (--fallback-defaults)"
            if not any(m["name"] == config["dataset"] for m in list_prepared()):
                from dermcam.data.prepare import prepare

                prepare(args.source, name=config["dataset"], seed=0, progress=progress)
            # fold_predictions asks only the number of folds and a name of its cross-validation
            cv = CrossValidation(args.home / "crossval" / "none",
                                 {"name": f"none ({config['folds']}-fold split)", "folds": config["folds"]})
        k, seed = int(config["folds"]), int(config["seed"])
        data = load_prepared(config["dataset"])
        fingerprint = (cv.record.get("dataset") or {}).get("fingerprint")
        if fingerprint is not None and fingerprint != data.fingerprint:
            raise AblationError(f"data set '{data.name}' changed since cv:{cv.name}: its folds would differ")
        rows, assigned = fold_assignment(data, k, seed)
        expected = sorted(map(str, data.index["image_id"].to_numpy()[rows[assigned == 0]]))
        stored = None
        if full_run is not None:
            oof = read_oof(cv)
            stored = {i: p for i, f, p in zip(oof.image_id, oof.fold, oof.probs) if int(f) == 0}
            if sorted(stored) != expected:
                raise AblationError(f"the recipe's stored fold-0 predictions ({len(stored)} images) are not fold 0 "
                                    f"of the {k}-fold split recomputed now ({len(expected)} images)")

        device = args.device or config.get("device") or "auto"
        models: list[dict[str, Any]] = []
        for variant in [FULL, *args.variant]:
            changes = VARIANTS.get(variant, {})
            for key, value in changes.items():
                if config.get(key) == value:
                    raise AblationError(f"the recipe ran with {key}={value!r} already: --variant {variant} "
                                        "leaves nothing out")
            if variant == FULL and full_run is not None:
                model = {"run": full_run["run_id"], "best": full_run["best"], "trained": "recipe (reused)",
                         "wall_min": None}
            else:
                model = fold0_run(config, changes, device, progress)
            ckpt = resolve(model["best"])
            trained_on = (ckpt.sidecar.get("dataset") or {}).get("fingerprint")
            if trained_on is not None and trained_on != data.fingerprint:
                raise AblationError(f"{variant}: checkpoint {ckpt.id} was trained on another version of data set "
                                    f"'{data.name}' (fingerprints differ)")
            predicted = fold_predictions(cv, 0, ckpt, device=device, progress=progress)
            ids = list(map(str, predicted.image_id))
            if sorted(ids) != expected:
                raise AblationError(f"{variant} (run {model['run']}) held out {len(ids)} images that are not fold 0 "
                                    f"of the recipe's split ({len(expected)} images): the comparison would be "
                                    "on other images")
            if models and ids != models[0]["ids"]:
                raise AblationError(f"{variant} predicted fold 0's images in another order than the full recipe")
            if variant == FULL and stored is not None:
                diff = float(max(np.abs(np.asarray(stored[i]) - p).max() for i, p in zip(ids, predicted.probs)))
                notes.append(f"the full recipe's fold-0 predictions made now differ from its stored out-of-fold "
                             f"ones by at most {diff:.2g} (probability)")
            models.append({"variant": variant, **model, "ckpt": ckpt, "ids": ids, "predicted": predicted,
                           "config": {**config, **changes}})
    table = score(models, list(cv.record.get("classes") or data.classes), args.resamples, args.bootstrap_seed)
    return {"rows": table, "cv": f"cv:{cv.name}" if full_run is not None else None, "options_source": source,
            "options": config, "fold": 0, "folds": k, "images": len(expected),
            "groups": len(set(map(str, models[0]["predicted"].group))), "test_split_read": False,
            "resamples": args.resamples, "bootstrap_seed": args.bootstrap_seed, "notes": notes,
            "args": {key: str(value) for key, value in vars(args).items()}, "peak_rss_mib": peak_rss_mib(),
            "wall_min_total": round((time.monotonic() - clock) / 60, 2), "machine_at_start": started}


def recipe_config(cv: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configuration every fold of ``cv`` ran with, and its fold-0 run's record (finished, with a best
    checkpoint, and configured as fold 0 of that configuration)."""
    from dermcam.store.paths import runs_dir
    from dermcam.store.runs import read_run

    record = cv.record
    entry = record["fold_runs"][0]
    if entry["status"] != "finished" or not entry.get("best"):
        raise AblationError(f"fold 0 of cv:{cv.name} is {entry['status']}; finish the recipe first "
                            f"(dermcam train --resume --run cv:{cv.name})")
    config = {**record["config"], "folds": record["folds"], "fold": None}
    info = read_run(runs_dir() / entry["run"])
    if not same_run_config(info["config"], {**config, "fold": 0}):
        raise AblationError(f"run {entry['run']} (fold 0 of cv:{cv.name}) has another configuration than its "
                            "cross-validation record")
    return config, {"run_id": entry["run"], "best": entry["best"]}


def default_config(options: dict[str, Any]) -> dict[str, Any]:
    """Every TrainConfig field of the recipe's options (what a cross-validation record holds)."""
    from dermcam.train.config import TrainConfig

    return dataclasses.asdict(TrainConfig.from_dict(options))


def check_recipe_results(path: Path, home: Path, name: str, config: dict[str, Any]) -> str:
    """The recipe's results JSON, when it describes this store's cross-validation, must have run with the
    record's options (a JSON of another run would describe rows this ablation does not compare to)."""
    if not path.is_file():
        return f"{path.name}: not written yet (the recipe has not finished); options from the store only"
    data = json.loads(path.read_text())
    ran = data.get("config") or {}
    if str(ran.get("home")) != str(home) or ran.get("name") != name:
        return f"{path.name} is from another store or cross-validation ({ran.get('home')}, {ran.get('name')}): " \
               "not compared"
    differ = {key: (value, config.get(key)) for key, value in (data.get("options") or {}).items()
              if config.get(key) != value}
    if differ:
        raise AblationError(f"{path.name} ran with other options than cv:{name} in the store "
                            f"(results JSON, store): {differ}")
    return f"{path.name}: its options agree with cv:{name}"


def same_run_config(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Equal apart from where a run executes (device, compile, trackers: a resume may change those)."""
    from dermcam.train.trainer import RESUME_OPTIONS

    def what(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in RESUME_OPTIONS}

    return what(stored) == what(wanted)


def finished_run(wanted: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run of the store trained with exactly ``wanted`` (a full TrainConfig as a dict), or None."""
    from dermcam.store.runs import list_runs, read_run

    for run_dir in list_runs():
        info = read_run(run_dir)
        if info["status"] == "finished" and info.get("best") and same_run_config(info["config"], wanted):
            return info
    return None


def fold0_run(config: dict[str, Any], changes: dict[str, Any], device: str, progress: Any) -> dict[str, Any]:
    """Fold 0 of the recipe's split with ``changes``: a finished run of exactly that configuration in the
    store, else a new one trained now (TrainConfig(folds=K, fold=0, ...), as the recipe's folds are)."""
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    wanted = dataclasses.asdict(TrainConfig.from_dict({**config, **changes, "fold": 0}))
    info = finished_run(wanted)
    if info is not None:
        return {"run": info["run_id"], "best": info["best"], "trained": "reused", "wall_min": None}
    start = time.monotonic()
    trackers = {"log": [], "log_model": False} if "log" in wanted else {}  # an ablation run is not mirrored
    result = train(TrainConfig.from_dict({**wanted, "device": device, **trackers}), progress=progress)
    if result.best_id is None:
        raise AblationError(f"run {result.run_id} saved no checkpoint")
    return {"run": result.run_id, "best": result.best_id, "trained": "now",
            "wall_min": round((time.monotonic() - start) / 60, 2)}


def score(models: list[dict[str, Any]], classes: list[str], resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per model: its metrics with intervals, and the paired interval of its difference to the
    first model (the full recipe), every interval from the same draws of lesion groups."""
    from dermcam.evaluate.bootstrap import confidence_intervals, paired_intervals
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.store.runs import read_metrics

    full = models[0]["predicted"]
    rows = []
    for model in models:
        predicted = model["predicted"]
        if not np.array_equal(predicted.label, full.label) or list(map(str, predicted.group)) != list(
                map(str, full.group)):
            raise AblationError(f"{model['variant']}: fold 0's labels or lesion groups differ from the full recipe's")
        metrics = compute_metrics(predicted.label, predicted.probs, classes)
        ci = confidence_intervals(predicted.label, predicted.probs, predicted.group, classes, resamples=resamples,
                                  seed=seed).ci
        diff = paired_intervals(full.label, full.probs, predicted.probs, full.group, classes, resamples=resamples,
                                seed=seed).ci
        epochs = read_metrics(model["ckpt"].run_dir)
        row: dict[str, Any] = {
            "variant": model["variant"], "metadata": model["config"].get("metadata"),
            "color_constancy": model["config"].get("color_constancy"), "run": model["run"], "best": model["best"],
            "trained": model["trained"], "epochs": len(epochs),
            "epoch_min": epoch_minutes(model["ckpt"].run_dir),
            "wall_min": model["wall_min"], "images": len(predicted), "groups": len(set(map(str, predicted.group)))}
        for key in METRICS:
            row[key] = metrics.get(key)
            row[f"{key}_ci"] = ci.get(key)
        for key in METRICS:
            value = metrics.get(key)
            base = rows[0][key] if rows else value
            row[f"d_{key}"] = None if value is None or base is None else round(float(value) - float(base), 6)
            row[f"d_{key}_ci"] = ci_or_none(diff.get(key)) if rows else None
        row["reading"] = reading(row) if rows else "the reference"
        rows.append(row)
    return rows


def ci_or_none(interval: list[float] | None) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


def reading(row: dict[str, Any]) -> str:
    """What the paired interval of balanced accuracy says about the part this variant leaves out."""
    interval = row.get("d_balanced_accuracy_ci")
    if interval is None:
        return "no interval"
    if interval[1] < 0:
        return "the part helps (balanced accuracy lower without it)"
    if interval[0] > 0:
        return "the part hurts (balanced accuracy higher without it)"
    return "no clear difference on this fold"


if __name__ == "__main__":
    main()
