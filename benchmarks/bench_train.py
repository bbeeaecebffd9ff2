"""Training throughput: the full loop (cache read + augmentation + step) vs the bare model step.

    python benchmarks/bench_train.py [--backbone efficientnet_lite0] [--batches 6] [--freeze 0 2 3] [--precision fp32]

Prepares ../shared/data/ham10000-lite into a temporary store (or uses --home with a prepared set),
then for fp32 and bf16 times (a) the bare step: forward, backward and AdamW step on one fixed batch,
and (b) the loop step: the same plus reading a fresh batch from the image cache and augmenting it.
The data pipeline is fine when (b) reaches >= 90% of (a). --freeze N measures `dermcam train --freeze N`
(the stem and the first N stages frozen: no backward pass through them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import LITE, peak_rss_mib, report, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", default="224", help="224 (square) or WIDTHxHEIGHT such as 192x144")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--home", type=Path, help="a store that already holds --data (skips prepare)")
    parser.add_argument("--data", default="ham10000-lite")
    parser.add_argument("--freeze", type=int, nargs="+", default=[0], help="frozen stages, one row per value")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--pretrained", default="none", help="weights do not change speed; the default skips loading")
    parser.add_argument("--name", help="results file name (default: train_throughput_BACKBONE_SIZE[_freezeN-M])")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="dermcam-bench-"))
    os.environ["DERMCAM_HOME"] = str(home)
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.train.config import TrainConfig
    from dermcam.train.schedule import epoch_order
    from dermcam.train.trainer import Trainer

    if not any(m["name"] == args.data for m in list_prepared()):
        print(f"preparing {LITE} into {home} ...")
        prepare(LITE, name=args.data)
    rows = []
    for precision, freeze in ((p, f) for f in args.freeze for p in args.precision):
        cfg = TrainConfig(freeze=freeze, dataset=args.data, backbone=args.backbone, pretrained=args.pretrained, batch_size=args.batch_size,
                          image_size=args.image_size,
                          precision=precision)
        trainer = Trainer(cfg)
        trainer.build()
        trainer.model.train()
        order = epoch_order(len(trainer.train_rows), trainer.train_labels, 0, 0, "loss", len(trainer.classes))
        fixed = trainer.make_batch(order, 0)
        counter = iter(range(10**9))

        def bare() -> None:
            trainer.forward_backward(*fixed)
            trainer._optimizer_step()

        def loop() -> None:
            b = next(counter) % trainer.batches_per_epoch
            trainer.forward_backward(*trainer.make_batch(order, b))
            trainer._optimizer_step()

        def data_only() -> None:
            trainer.make_batch(order, next(counter) % trainer.batches_per_epoch)

        t_bare, t_loop, t_data = timed(bare, args.batches), timed(loop, args.batches), timed(data_only, args.batches)
        rows.append({"backbone": args.backbone, "precision": precision, "batch": args.batch_size,
                     "size": args.image_size, "freeze": freeze, "bare_img_s": args.batch_size / t_bare,
                     "loop_img_s": args.batch_size / t_loop, "loop_vs_bare": t_bare / t_loop,
                     "data_ms_per_batch": t_data * 1000, "peak_rss_mib": peak_rss_mib()})
    suffix = "" if args.freeze == [0] else "_freeze" + "-".join(map(str, args.freeze))
    report(args.name or f"train_throughput_{args.backbone}_{args.image_size}{suffix}", rows)


if __name__ == "__main__":
    main()
