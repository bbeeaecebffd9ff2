"""Shared helpers for the benchmark scripts: a result table on stdout, JSON in benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-lite"


def timed(fn: Callable[[], Any], n: int, *, warmup: bool = True, sync: Callable[[], Any] | None = None) -> float:
    """Mean seconds per call of ``fn`` over ``n`` calls, after one untimed warm-up call (allocations,
    kernel selection) unless ``warmup`` is False (to time a first call, compiling included). ``sync``
    (``torch.cuda.synchronize``) runs before the clock starts and before it stops, so queued GPU work
    is counted."""
    if warmup:
        fn()
    if sync is not None:
        sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - start) / n


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide dermcam's speed on a CPU (bf16 autocast pays only with the first two).
FLAGS = ("amx_bf16", "avx512_bf16", "amx_tile", "avx512f", "avx512_vnni", "avx2", "fma")


def cpu_flags() -> list[str]:
    """Which of :data:`FLAGS` this CPU has (dermcam's own /proc/cpuinfo reader; empty where it cannot be read)."""
    from dermcam.models.device import cpu_flags as read_flags

    try:
        have = read_flags() or set()
    except OSError:
        return []
    return [flag for flag in FLAGS if flag in have]


def epoch_minutes(run_dir: Path) -> float:
    """The sum of a run's recorded epoch times (training and validation), in minutes: a run's own cost
    however many processes it took (a resumed run's clock in one process sees only the rest)."""
    from dermcam.store.runs import read_metrics

    return round(sum(float(e.get("seconds") or 0.0) for e in read_metrics(Path(run_dir))) / 60, 2)


def machine() -> dict[str, Any]:
    import torch

    from dermcam.models.device import cpu_supports_bf16

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "native_bf16": cpu_supports_bf16(), "load_average": os.getloadavg(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Print ``rows`` as an aligned table and write them with machine info to results/<name>.json."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})},
                               indent=2, default=str) + "\n")
    print(f"\nwritten {path}")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
