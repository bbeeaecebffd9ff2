"""How many images of a set with no copy of the training images does the overlap check flag anyway?

``dermcam evaluate --data OTHER`` leaves out images within ``--overlap-threshold`` of a training image
(docs/evaluation.md). Planted copies say how many real copies each threshold finds
(bench_duplicates.py); this says what it costs on a set that holds none: ham10000-lite's test split
against its train split, which share no lesion and no near-duplicate pair (prepare grouped them), so
every match is a look-alike (or a copy the audit's nearest-partner filter left apart). Per threshold:
the test images flagged, the pairs, and how many pairs share the label; plus the time of the search.

    python benchmarks/bench_overlap.py [--home /tmp/dermcam-overlap]   # prepares the lite copy there once

Writes benchmarks/results/overlap.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import LITE, report

THRESHOLDS = (0.02, 0.03, 0.04, 0.045, 0.05, 0.055, 0.06)
NAME = "ham10000-lite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/dermcam-overlap"),
                        help="store holding (or to hold) the prepared lite copy")
    parser.add_argument("--lite", type=Path, default=LITE)
    args = parser.parse_args()

    from dermcam.data.dataset import load_prepared
    from dermcam.data.fingerprint import near_duplicate_pairs
    from dermcam.data.prepare import prepare
    from dermcam.errors import NotFoundError

    try:
        data = load_prepared(NAME, args.home)
    except NotFoundError:
        prepare(args.lite, name=NAME, root=args.home)
        data = load_prepared(NAME, args.home)
    fps = data.fingerprints()
    test, _ = data.split("test")
    train, _ = data.split("train")
    labels = data.index["dx"].to_numpy(dtype=str)
    start = time.perf_counter()
    pairs, distances = near_duplicate_pairs(fps[test], fps[train], max(THRESHOLDS))
    seconds = time.perf_counter() - start
    rows = []
    for threshold in THRESHOLDS:
        within = pairs[distances <= threshold]
        same = labels[test[within[:, 0]]] == labels[train[within[:, 1]]]
        flagged = len(np.unique(within[:, 0]))
        rows.append({"threshold": threshold, "test_images_flagged": flagged,
                     "share_flagged": round(flagged / len(test), 4), "pairs": len(within),
                     "pairs_same_label": round(float(same.mean()), 3) if len(within) else None})
    report("overlap", rows, {"dataset": NAME, "manifest_fingerprint": data.fingerprint, "test_images": len(test),
                             "train_images": len(train), "search_seconds": round(seconds, 2)})


if __name__ == "__main__":
    main()
