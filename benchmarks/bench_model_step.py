"""How fast is one bare training step on this CPU, and which precision / memory format should dermcam use?

Measures forward + backward + AdamW step (batch 32, 224x224, 3-class head, random weights: weights do not
change speed) for efficientnet_lite0 and convnext_tiny, in fp32 and bf16 autocast, with the default
(contiguous NCHW) and channels_last memory formats. Each configuration runs in its own subprocess so its
peak RSS is its own. The first step (oneDNN primitive creation, allocator warm-up) is not timed.

    python benchmarks/bench_model_step.py            # full table, writes benchmarks/results/model_step.json
    python benchmarks/bench_model_step.py --steps 1  # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ("efficientnet_lite0", "convnext_tiny")
PRECISIONS = ("fp32", "bf16")
FORMATS = ("contiguous", "channels_last")
BATCH = 32
SIZE = 224
RESULT = Path(__file__).resolve().parent / "results" / "model_step.json"


def one_config(backbone: str, precision: str, memory_format: str, steps: int) -> dict:
    """Run warm-up + ``steps`` timed training steps in this process; return timings and peak RSS."""
    import torch
    import torch.nn.functional as F

    from dermcam.models.backbones import build_model
    from dermcam.models.device import select_device

    select_device("cpu")  # dermcam's own process setup (the allocator tune), as every command has it
    torch.manual_seed(0)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = build_model(backbone, 3).train().to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=fmt)
    labels = torch.randint(0, 3, (BATCH,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    warmup_s = step()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    return {
        "backbone": backbone,
        "precision": precision,
        "memory_format": memory_format,
        "warmup_step_s": round(warmup_s, 3),
        "step_s": [round(t, 3) for t in times],
        "median_step_s": round(median, 3),
        "images_per_s": round(BATCH / median, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_all(steps: int) -> list[dict]:
    """Each configuration in a fresh interpreter, so RSS and allocator state do not leak between them."""
    rows = []
    for backbone in BACKBONES:
        for precision in PRECISIONS:
            for memory_format in FORMATS:
                cmd = [sys.executable, __file__, "--one", backbone, precision, memory_format,
                       "--steps", str(steps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                print(f"  done {backbone} {precision} {memory_format}: {row['images_per_s']} img/s",
                      file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'backbone':<20}{'precision':<11}{'format':<15}{'img/s':>8}{'step s':>9}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backbone']:<20}{r['precision']:<11}{r['memory_format']:<15}{r['images_per_s']:>8}"
              f"{r['median_step_s']:>9}{r['peak_rss_mb']:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--one", nargs=3, metavar=("BACKBONE", "PRECISION", "FORMAT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_config(*args.one, steps=args.steps)))
        return

    import torch

    from dermcam.models.device import cpu_supports_bf16
    from dermcam.store.files import atomic_write_json

    started, load_at_start = time.time(), os.getloadavg()
    rows = run_all(args.steps)
    print_table(rows)
    atomic_write_json(RESULT, {
        "benchmark": "model_step",
        "what": f"forward+backward+AdamW step, batch {BATCH}, {SIZE}x{SIZE}, 3 classes, CPU",
        "timed_steps_per_config": args.steps,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_supports_bf16": cpu_supports_bf16(),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "total_wall_s": round(time.time() - started, 1),
        "results": rows,
    })
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
