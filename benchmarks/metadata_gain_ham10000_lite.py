"""The gain of patient metadata: the same training with and without ``--metadata``, same split, same seed.

    python benchmarks/metadata_gain_ham10000_lite.py [--home /tmp/dermcam-meta] [--epochs 14] [--fields age,sex,site]

Prepares ../shared/data/ham10000-lite (lesion-grouped 70/15/15 split, seed 0) in a store of its own (the
store metadata_baseline.py uses, so the three compare on one split), then trains efficientnet_lite0 from
the offline ImageNet weights twice with one configuration, the second run with ``--metadata``, and
reports both best checkpoints' test metrics and the difference. ``--smoke``: one epoch of a tiny model
without pretrained weights, to check the script, not to measure anything.

One seed is one draw: a difference of a point or two of balanced accuracy is within what another seed
changes; repeat with --seed for a spread. Results go to benchmarks/results/metadata_gain[_smoke].json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import LITE, report

HEADLINE = ("balanced_accuracy", "recall_mel", "auc_macro", "macro_f1", "accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-meta"))
    parser.add_argument("--name", default="ham10000-lite")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", default="192x144")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--freeze", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fields", default="age,sex,site")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="one epoch of a tiny random model: checks the script")
    args = parser.parse_args()

    os.environ["DERMCAM_HOME"] = str(args.home)
    from dermcam.data.dataset import list_prepared
    from dermcam.progress import rich_progress
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    if args.smoke:
        args.backbone, args.image_size, args.epochs, args.freeze = "test_efficientnet", "64x48", 1, 0
    with rich_progress() as progress:
        if not any(m["name"] == args.name for m in list_prepared()):
            from dermcam.data.prepare import prepare

            prepare(LITE, name=args.name, seed=0, progress=progress)
        rows, runs = [], {}
        for metadata in (None, args.fields):
            start = time.monotonic()
            config = TrainConfig(dataset=args.name, backbone=args.backbone,
                                 pretrained="none" if args.smoke else "auto", image_size=args.image_size,
                                 epochs=args.epochs, lr=args.lr, freeze=args.freeze, batch_size=args.batch_size,
                                 seed=args.seed, patience=99, device=args.device, metadata=metadata)
            result = train(config, progress=progress)
            test = result.test_metrics or {}
            runs[metadata or "image only"] = {"run_id": result.run_id, "best": result.best_id, "test": test}
            rows.append({"metadata": metadata or "none", "best": result.best_id,
                         **{f"test_{k}": test.get(k) for k in HEADLINE}, "train_min": (time.monotonic() - start) / 60})
    gain = {k: rows[1][f"test_{k}"] - rows[0][f"test_{k}"] for k in HEADLINE
            if rows[0][f"test_{k}"] is not None and rows[1][f"test_{k}"] is not None}
    report("metadata_gain" + ("_smoke" if args.smoke else ""), rows,
           {"gain": gain, "runs": runs, "config": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
