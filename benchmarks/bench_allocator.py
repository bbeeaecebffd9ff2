"""Does dermcam's allocator tune pay (:func:`dermcam.models.device.tune_cpu_allocator`)? Each workload
runs in its own process, tuned (dermcam's default) and untuned (``DERMCAM_ALLOCATOR=system``, glibc's
defaults), alternating, ``--repeats`` times; the process's own wall, user and kernel time, minor page
faults and peak RSS come from ``os.wait4``.

    python benchmarks/bench_allocator.py [--repeats 2] [--steps 5]
        [--home STORE [--audit CKPT [--limit 160]]]   # plus dermcam's training loop, and a stress audit

Workloads:

- ``train_step``: :mod:`bench_model_step`'s bare training step (tf_efficientnet_lite0, fp32,
  channels_last, batch 32 at 224x224, random weights), ``--steps`` timed steps after one warm-up; its
  ``median_step_s`` is the number to compare;
- ``train_loop`` (only with ``--home``, a store holding a prepared ham10000-lite):
  :mod:`bench_train`'s training loop (cache read, augmentation, step, as ``dermcam train`` runs it) for
  the cross-validated recipe's backbone and size (tf_efficientnet_lite0, 192x144, fp32), with nothing
  frozen and with ``--freeze 2``, 6 timed batches each; ``loop_s_per_batch`` is the two summed;
- ``audit_stress`` (only with ``--audit``): ``dermcam audit CKPT --only stress --limit N --threads 2``
  on the checkpoint's own test split in store ``--home``: 17 scoring passes over N images (baseline
  and 16 perturbations), perturbing included; ``stress`` is its own clock.

Run it alone (``uptime`` first): a busy second core changes both sides. Results:
benchmarks/results/allocator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS, report

HERE = Path(__file__).resolve().parent
MODES = {"tuned": {}, "system": {"DERMCAM_ALLOCATOR": "system"}}
LOOP_RESULT = "allocator_train_loop"  # bench_train.py's results file while this runs
_OWN = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "DERMCAM_ALLOCATOR")


def measured(cmd: list[str], env: dict[str, str]) -> tuple[str, dict[str, float]]:
    """Run ``cmd``; its stdout and its own resource use (not any other child's)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_OWN)}
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**clean, **env}, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        out.seek(0)
        text = out.read().decode()
    return text, {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
                  "minor_faults": usage.ru_minflt, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def step_seconds(stdout: str) -> float:
    """bench_model_step.py's median seconds per step, from its JSON line."""
    return float(json.loads(stdout[stdout.index("{"):])["median_step_s"])


def loop_seconds(stdout: str) -> float:
    """bench_train.py's seconds per batch of the training loop, frozen and unfrozen summed, from the
    results file it wrote (read, then removed: its rows belong to this benchmark)."""
    path = RESULTS / f"{LOOP_RESULT}.json"
    rows = json.loads(path.read_text())["rows"]
    path.unlink()
    return round(sum(row["batch"] / row["loop_img_s"] for row in rows), 3)


def stress_seconds(stdout: str) -> float:
    """``dermcam audit --json``'s own clock of the stress part."""
    return float(json.loads(stdout[stdout.index("{"):])["seconds"]["stress"])


Workload = tuple[list[str], dict[str, str], str, Callable[[str], float]]


def workloads(args: argparse.Namespace, scratch: Path) -> dict[str, Workload]:
    """Each workload's command, its environment, the name of its own timing and how to read it."""
    jobs: dict[str, Workload] = {
        "train_step": ([sys.executable, str(HERE / "bench_model_step.py"), "--one", "tf_efficientnet_lite0", "fp32",
                        "channels_last", "--steps", str(args.steps)], {}, "median_step_s", step_seconds)}
    if args.home:
        jobs["train_loop"] = ([sys.executable, str(HERE / "bench_train.py"), "--home", str(args.home),
                               "--backbone", "tf_efficientnet_lite0", "--image-size", "192x144", "--freeze", "0", "2",
                               "--precision", "fp32", "--batches", "6", "--name", LOOP_RESULT], {},
                              "loop_s_per_batch", loop_seconds)
    if args.audit:
        jobs["audit_stress"] = ([sys.executable, "-m", "dermcam", "audit", args.audit, "--only", "stress",
                                 "--limit", str(args.limit), "--threads", "2", "--out", str(scratch / "audit"),
                                 "--json"], {"DERMCAM_HOME": str(args.home)}, "stress", stress_seconds)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--audit", help="a checkpoint id in --home to audit (default: no audit workload)")
    parser.add_argument("--home", type=Path, help="a store with a prepared ham10000-lite (and --audit's checkpoint)")
    parser.add_argument("--limit", type=int, default=160)
    args = parser.parse_args()
    if args.audit and not args.home:
        parser.error("--audit needs --home")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cmd, extra, key, read) in workloads(args, Path(tmp)).items():
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode, env in MODES.items():
                    text, usage = measured(cmd, {**extra, **env})
                    runs[mode].append({key: read(text), **usage})
                    print(f"  {name} {mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
            for mode, done in runs.items():
                rows.append({"workload": name, "allocator": mode, "repeats": len(done),
                             **{k: statistics.median(r[k] for r in done) for k in done[0]}})
            tuned, system = (next(r for r in rows if r["workload"] == name and r["allocator"] == m)
                             for m in ("tuned", "system"))
            tuned["speedup"] = round(system[key] / tuned[key], 2)
    report("allocator", rows, {"what": "tuned = dermcam's mallopt (M_MMAP_MAX 0, M_TRIM_THRESHOLD -1: never trim); "
                                       "system = glibc's defaults (DERMCAM_ALLOCATOR=system); medians of repeats",
                               "options": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
