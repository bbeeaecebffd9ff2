"""Sharing the CPU: how fast is ``dermcam explain`` with ``--threads 1``, ``2`` and ``auto``, on an idle
machine and while another process keeps every core busy? (issue 23, "Sharing the CPU")

Two processes that each use every core slow each other down several-fold: OpenMP threads wait on
each other. This measures the wall time of one ``dermcam explain`` subprocess (start-up included) on
16 real HAM10000-lite images with Grad-CAM (efficientnet_lite0, random weights: weights do not change
speed), first on an idle machine, then while a background process runs a torch matmul loop on all
cores (started and killed here). ``auto_threads`` is what ``--threads auto`` resolved to just before
the run (``dermcam.models.device.resolve_threads``), ``load_1min`` the load average then.

    python benchmarks/bench_threads.py            # writes benchmarks/results/threads.json (~3 minutes)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402
from bench_explain import make_checkpoint, make_images  # noqa: E402

IMAGES = 16
SETTINGS = ("1", "2", "auto")
BUSY_WARMUP_S = 40  # the 1-minute load average lags: let it see the busy process before auto is measured
BUSY_LOOP = ("import torch\nx = torch.randn(1024, 1024)\nwhile True:\n    x = (x @ x).clamp_(-1, 1)\n")


def run_explain(ckpt_id: str, folder: Path, out: Path, threads: str) -> float:
    """Wall seconds of one ``dermcam explain FOLDER --threads threads`` subprocess."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dermcam", "explain", str(folder), "--checkpoint", ckpt_id, "-o", str(out),
                    "--threads", threads, "--json"], check=True, capture_output=True, env=os.environ.copy())
    return time.perf_counter() - start


def measure(state: str, ckpt_id: str, folder: Path, out: Path) -> list[dict[str, object]]:
    from dermcam.models.device import resolve_threads

    rows = []
    for threads in SETTINGS:
        rows.append({"machine_state": state, "threads": threads, "auto_threads": resolve_threads("auto"),
                     "load_1min": round(os.getloadavg()[0], 2),
                     "explain_16_s": round(run_explain(ckpt_id, folder, out, threads), 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DERMCAM_HOME"] = str(Path(tmp) / "home")
        folder = Path(tmp) / "images"
        make_images(folder, IMAGES)
        ckpt_id = make_checkpoint("efficientnet_lite0")
        out = Path(tmp) / "out"
        run_explain(ckpt_id, folder, out, "1")  # warm the file cache and Python's bytecode
        rows = measure("idle", ckpt_id, folder, out)
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])  # torch's default: every core
        try:
            time.sleep(BUSY_WARMUP_S)
            rows += measure("busy (matmul loop on all cores)", ckpt_id, folder, out)
        finally:
            busy.kill()
            busy.wait()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    report("threads", rows, {"images": IMAGES, "backbone": "efficientnet_lite0", "method": "gradcam",
                             "busy_process": BUSY_LOOP, "busy_warmup_s": BUSY_WARMUP_S, "uptime_after": uptime})


if __name__ == "__main__":
    main()
