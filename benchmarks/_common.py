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


def machine() -> dict[str, Any]:
    import torch

    from dermcam.models.device import cpu_supports_bf16

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "native_bf16": cpu_supports_bf16(), "load_average": os.getloadavg(),
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
