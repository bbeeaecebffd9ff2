"""How long the lesion bootstrap of `dermcam evaluate` takes: 95% intervals of every headline metric.

Synthetic predictions (3 classes, about 1.5 images per lesion, probabilities rounded to 0.01 so there
are ties, as with real softmax outputs stored in a CSV); the timed call is exactly what `evaluate`
runs, :func:`dermcam.evaluate.bootstrap.confidence_intervals`. Goal of issue 13: well under 5 s for
2,000 images and 1,000 resamples.

    python benchmarks/bench_bootstrap.py --images 500 2000 8000 --resamples 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import report


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)
    lesions = [f"lesion{i * 2 // 3}" for i in range(n)]
    return y, probs, lesions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from dermcam.evaluate.bootstrap import confidence_intervals

    rows = []
    for n in args.images:
        y, probs, lesions = synthetic(n)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            confidence_intervals(y, probs, lesions, ["bkl", "mel", "nv"], resamples=args.resamples, seed=0)
            times.append(time.perf_counter() - started)
        rows.append({"images": n, "lesions": len(set(lesions)), "resamples": args.resamples,
                     "seconds_best": min(times), "seconds_median": float(np.median(times))})
    report("bootstrap", rows)


if __name__ == "__main__":
    main()
