"""CLI start-up: wall time and peak memory of `dermcam --help` and friends (they must not import torch).

    python benchmarks/bench_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _common import report

COMMANDS = [["--help"], ["prepare", "--help"], ["train", "--help"], ["explain", "--help"], ["--version"]]
PROBE = ("import resource, sys, runpy; sys.argv = ['dermcam'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('dermcam', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "heavy = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'HEAVY', ','.join(heavy) or '-', file=sys.stderr)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for argv in COMMANDS:
        times, peak, heavy = [], 0.0, "-"
        for _ in range(args.repeat):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - start)
            fields = proc.stderr.split()
            peak, heavy = int(fields[fields.index("PEAK") + 1]) / 1024, fields[fields.index("HEAVY") + 1]
        rows.append({"command": "dermcam " + " ".join(argv), "median_s": statistics.median(times),
                     "min_s": min(times), "peak_rss_mib": peak, "heavy_imports": heavy})
    report("startup", rows, {"repeat": args.repeat})


if __name__ == "__main__":
    main()
