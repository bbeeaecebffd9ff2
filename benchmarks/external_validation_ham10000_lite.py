"""External validation, worked end to end on the real HAM10000-lite copy (docs/results.md).

    python benchmarks/external_validation_ham10000_lite.py [--home /tmp/dermcam-external] [--epochs 10]

1. Holds out a lesion-disjoint 20% of ham10000-lite's lesions (seeded) *before* anything is prepared:
   the model never sees them, not even in its validation or test split.
2. Re-encodes the held-out images as another camera would deliver them: a warmer white balance, a
   little more contrast, 4:3 cropped to square, JPEG quality 70. That copy is laid out as a plain CSV
   (path, label, lesion) and prepared with ``--layout csv --external``.
3. Prepares the other 80% as usual (lesion-grouped 70/15/15), trains efficientnet_lite0 from the
   offline ImageNet weights (``--freeze 2``, 192x144), evaluates it once on its own test split and
   then on the external set, both with 95% lesion-bootstrap intervals and subgroups.

The two source folders are built under --home (symlinks for the internal part, re-encoded JPEGs for the
external one); nothing is written into the project except benchmarks/results/external_validation.json.
A finished run in --home is reused, so the evaluation can be re-run without training again.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import LITE, report

CLASSES = ("bkl", "mel", "nv")


def split_lesions(seed: int, fraction: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Rows of the lite metadata: (internal, external), whole lesions on one side."""
    with open(LITE / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    lesions = sorted({r["lesion_id"] for r in rows})
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(lesions, size=round(len(lesions) * fraction), replace=False))
    return [r for r in rows if r["lesion_id"] not in held_out], [r for r in rows if r["lesion_id"] in held_out]


def image_file(image_id: str) -> Path:
    return next(LITE.glob(f"HAM10000_images_part_*/{image_id}.jpg"))


def write_images(rows: list[dict[str, str]], folder: Path, make: Callable[[Path, Path], object]) -> None:
    """``make(original, target)`` for every row's image not yet in ``folder`` (a re-run redoes nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = folder / f"{row['image_id']}.jpg"
        if not target.exists():
            make(image_file(row["image_id"]), target)


def write_internal(rows: list[dict[str, str]], dest: Path) -> Path:
    """A HAM10000-layout folder of symlinks to the internal images (nothing copied)."""
    write_images(rows, dest / "HAM10000_images_part_1", lambda original, link: link.symlink_to(original))
    with open(dest / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def other_camera(path: Path, out: Path) -> None:
    """Warmer, more contrast, square crop, JPEG quality 70: a different dermatoscope and pipeline."""
    from PIL import Image, ImageEnhance

    with Image.open(path) as image:
        photo = image.convert("RGB")
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side))
    r, g, b = photo.split()
    photo = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.06))), g, b.point(lambda v: int(v * 0.92))))
    ImageEnhance.Contrast(photo).enhance(1.15).save(out, quality=70)


def write_external(rows: list[dict[str, str]], dest: Path) -> Path:
    """The held-out lesions, re-encoded, as a CSV layout: path, diagnosis, lesion, sex, age, site."""
    write_images(rows, dest / "images", other_camera)
    with open(dest / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "diagnosis", "lesion", "sex", "age", "localization"])
        for row in rows:
            writer.writerow([f"images/{row['image_id']}.jpg", row["dx"], row["lesion_id"], row["sex"], row["age"],
                             row["localization"]])
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-external"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--freeze", type=int, default=2)
    parser.add_argument("--image-size", default="192x144")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of lesions held out as external")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--train-only", action="store_true", help="stop after training (evaluate later)")
    args = parser.parse_args()

    os.environ["DERMCAM_HOME"] = str(args.home / "store")
    from dermcam.data.dataset import list_prepared
    from dermcam.data.prepare import prepare
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.progress import rich_progress
    from dermcam.store.runs import list_runs, read_run
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    internal_rows, external_rows = split_lesions(args.seed, args.held_out)
    prepared = {m["name"] for m in list_prepared()}
    started = time.monotonic()
    with rich_progress() as progress:
        if "lite-internal" not in prepared:
            prepare(write_internal(internal_rows, args.home / "internal"), name="lite-internal", progress=progress)
        finished = [r for r in list_runs() if read_run(r).get("status") == "finished"]
        if finished:
            best_id = read_run(finished[-1])["best"]
            train_minutes = None
        else:
            config = TrainConfig(dataset="lite-internal", backbone="efficientnet_lite0", pretrained="auto",
                                 image_size=args.image_size, epochs=args.epochs, lr=args.lr, freeze=args.freeze,
                                 patience=99, seed=args.seed)
            result = train(config, progress=progress)
            best_id, train_minutes = result.best_id, (time.monotonic() - started) / 60
        if args.train_only:
            return
        if "lite-external" not in prepared:
            prepare(write_external(external_rows, args.home / "external"), name="lite-external", layout="csv",
                    image_col="path", label_col="diagnosis", group_col="lesion", external=True,
                    progress=progress)
        internal = evaluate(best_id, split="test", resamples=args.resamples, progress=progress,
                            out_dir=args.home / "report-internal")
        external = evaluate(best_id, dataset="lite-external", resamples=args.resamples, progress=progress,
                            out_dir=args.home / "report-external")
    rows = []
    for name, result in (("internal test", internal), ("external (other camera)", external)):
        m, ci = result.metrics, result.metrics["ci"]["intervals"]
        rows.append({"set": name, "images": m["n"], **{
            key: f"{m[key]:.3f} ({ci[key][0]:.3f}-{ci[key][1]:.3f})"
            for key in ("balanced_accuracy", "recall_mel", "macro_f1", "auc_macro")}})
    report("external_validation", rows, {"checkpoint": best_id, "train_minutes": train_minutes,
                                         "internal": internal.to_dict(), "external": external.to_dict(),
                                         "held_out_lesions": len({r["lesion_id"] for r in external_rows}),
                                         "config": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
