"""CLI start-up: wall time and peak memory of `dermcam --help` and friends (they must not import torch),
and of one `dermcam explain IMAGE` end to end, with where its time goes.

The explain case uses bench_explain's checkpoint (efficientnet_lite0, random weights, 224x224) in a
temporary store and one image. Then, in fresh interpreters, what that command imports is imported
step by step in its order (``explain_imports_s``): each step's time counts only what the steps
before it had not imported yet (median over the repeats).

    python benchmarks/bench_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import report

COMMANDS = [["--help"], ["prepare", "--help"], ["train", "--help"], ["explain", "--help"], ["--version"]]
PROBE = ("import resource, sys, runpy; sys.argv = ['dermcam'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('dermcam', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "heavy = [m for m in ('torch', 'timm', 'torchvision', 'torch._dynamo') if m in sys.modules]\n"
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'HEAVY', ','.join(heavy) or '-', file=sys.stderr)")
# What `dermcam explain` imports, in the order it imports it; the last step is
# dermcam.models.timm_import.import_timm (torchvision and timm, torch._dynamo left for later, the
# collector paused), the way evaluate and explain import timm.
IMPORT_STEPS = ("dermcam.cli", "dermcam.explain.pipeline", "dermcam.store.inference", "torch", "timm")
STEP_PROBE = ("import gc, importlib, sys, time\n"
              "gc.disable()\n"
              "from dermcam.models.timm_import import import_timm\n"
              "for name in sys.argv[1:]:\n"
              "    start = time.perf_counter()\n"
              "    import_timm() if name == 'timm' else importlib.import_module(name)\n"
              "    print(name, time.perf_counter() - start)")


def time_command(argv: list[str], repeat: int, env: dict[str, str] | None = None) -> dict[str, object]:
    """Median and best wall time of ``dermcam ARGV`` in a fresh interpreter, its peak RSS and heavy imports."""
    times, peak, heavy = [], 0.0, "-"
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True,
                              env=env)
        times.append(time.perf_counter() - start)
        fields = proc.stderr.split()
        peak, heavy = int(fields[fields.index("PEAK") + 1]) / 1024, fields[fields.index("HEAVY") + 1]
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_rss_mib": peak, "heavy_imports": heavy}


def import_breakdown(repeat: int) -> dict[str, float]:
    """Median seconds of each of :data:`IMPORT_STEPS`, imported in order in fresh interpreters."""
    runs: dict[str, list[float]] = {name: [] for name in IMPORT_STEPS}
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", STEP_PROBE, *IMPORT_STEPS], capture_output=True, text=True,
                              check=True)
        for line in proc.stdout.splitlines():
            name, seconds = line.split()
            runs[name].append(float(seconds))
    return {name: statistics.median(times) for name, times in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-explain", action="store_true", help="only the --help/--version commands")
    args = parser.parse_args()
    rows = [{"command": "dermcam " + " ".join(argv), **time_command(argv, args.repeat)} for argv in COMMANDS]
    extra: dict[str, object] = {"repeat": args.repeat}
    if not args.no_explain:
        from bench_explain import make_checkpoint, make_images

        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DERMCAM_HOME"] = str(Path(tmp) / "home")
            ckpt_id = make_checkpoint("efficientnet_lite0")
            image = make_images(Path(tmp) / "images", 1)[0]
            argv = ["explain", str(image), "-c", ckpt_id, "-o", str(Path(tmp) / "out")]
            rows.append({"command": "dermcam explain IMAGE (efficientnet_lite0, 224x224)",
                         **time_command(argv, args.repeat, env=os.environ.copy())})
            rows.append({"command": "the same, DERMCAM_EAGER_DYNAMO=1 (torch._dynamo imported with timm)",
                         **time_command(argv, args.repeat, env={**os.environ, "DERMCAM_EAGER_DYNAMO": "1"})})
        extra["explain_imports_s"] = import_breakdown(args.repeat)
        print("explain's imports, in order (median s):",
              ", ".join(f"{k} {v:.2f}" for k, v in extra["explain_imports_s"].items()))
    report("startup", rows, extra)


if __name__ == "__main__":
    main()
