"""How fast does ``dermcam serve`` answer, idle and under load, with and without server-side batching?

A bounded load test against 127.0.0.1 only: it starts ``dermcam serve`` (a real process, random
efficientnet_lite0 weights at 192x144: weights do not change speed), and for each configuration

- ``idle_p50_ms`` / ``idle_p95_ms``: latency of one image without CAM, one request at a time (an idle
  server), after warm-up requests;
- ``load_*``: ``--clients`` threads, each with its own keep-alive connection, each sending ``--requests``
  single-image requests one after another (a fixed number: the test stops by itself): p50/p95 latency,
  throughput in images/s, errors (must be 0), and the batch sizes the server formed (``/v1/model``).

Configurations: batched (``--max-batch 16 --max-wait-ms 10``, the defaults) and unbatched
(``--max-batch 1``). Images are real HAM10000-lite JPEGs when ../shared/data/ham10000-lite exists,
otherwise random ones. The client runs on the same machine and takes some of its CPU: the numbers
are what a local client sees. Record them on a quiet machine: the CPU model, its flags and the load
average before and after are written with them.

    python benchmarks/bench_serve.py            # 16 clients x 200 requests; writes benchmarks/results/serve.json
    python benchmarks/bench_serve.py --threads 1   # the server with one torch thread (a busy machine)
    python benchmarks/bench_serve.py --smoke    # a tiny model, 2 clients x 3 requests; writes nothing
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LITE, cpu_flags, cpu_model, report  # noqa: E402

CONFIGS = (("batched", ["--max-batch", "16", "--max-wait-ms", "10"]), ("unbatched", ["--max-batch", "1"]))


def make_checkpoint(backbone: str, input_size: tuple[int, int]) -> str:
    """A store checkpoint of ``backbone`` with random weights at ``input_size`` (W, H); its id."""
    import torch

    from dermcam.models.backbones import build_model
    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    model = build_model(backbone, 3)
    run = create_run({"backbone": backbone})
    sidecar = {"backbone": backbone, "classes": ["nv", "bkl", "mel"],
               "preprocessing": {"input_size": [3, input_size[1], input_size[0]], "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"},
               "metrics": {}, "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.0}}
    return save_checkpoint(run, epoch=0, model_state=model.state_dict(), sidecar=sidecar).id


def load_images(count: int) -> list[bytes]:
    """``count`` JPEG files' bytes: real lesions when available (200x150), else random 600x450."""
    import io

    import numpy as np
    from PIL import Image

    real = sorted((LITE / "HAM10000_images_part_1").glob("*.jpg"))[:count] if LITE.exists() else []
    images = [p.read_bytes() for p in real]
    for i in range(len(images), count):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (450, 600, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return images


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"lesion.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> dict[str, Any]:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        return json.loads(response.read())

    def predict(self, data: bytes) -> tuple[float, bool]:
        """(seconds, answered with 200 and one image)."""
        body, kind = multipart(data)
        start = time.perf_counter()
        try:
            self.connection.request("POST", "/v1/predict", body=body, headers={"Content-Type": kind})
            response = self.connection.getresponse()
            payload = response.read()
            ok = response.status == 200 and len(json.loads(payload)["images"]) == 1
        except (OSError, http.client.HTTPException, ValueError):
            self.connection.close()
            ok = False
        return time.perf_counter() - start, ok


def start(ckpt: str, options: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "dermcam", "serve", ckpt, "--port", "0", "--device", "cpu",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(ckpt: str, name: str, options: list[str], images: list[bytes], clients: int, requests: int,
            idle: int) -> dict[str, Any]:
    proc, port = start(ckpt, options)
    try:
        probe = Client(port)
        for data in images[:3]:
            probe.predict(data)  # warm-up: allocations, oneDNN kernels
        idle_times = [probe.predict(images[i % len(images)])[0] for i in range(idle)]
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()

        def client(k: int) -> None:
            session = Client(port)
            for i in range(requests):
                seconds, ok = session.predict(images[(k * requests + i) % len(images)])
                with lock:
                    latencies.append(seconds)
                    errors[0] += not ok

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        card = Client(port).get("/v1/model")  # a new connection: the probe's idled past keep-alive
        stats = card["stats"]
    finally:
        exit_code = stop(proc)
    return {"config": name, "threads": card["threads"], "idle_p50_ms": 1000 * statistics.median(idle_times),
            "idle_p95_ms": 1000 * percentile(idle_times, 0.95), "clients": clients, "requests": clients * requests,
            "load_p50_ms": 1000 * statistics.median(latencies), "load_p95_ms": 1000 * percentile(latencies, 0.95),
            "load_img_s": len(latencies) / wall, "errors": errors[0], "largest_batch": stats["largest_batch"],
            "mean_batch": round(stats["images"] / max(stats["batches"], 1), 2), "exit_code": exit_code}


def uptime() -> str:
    """``uptime``'s line (the load average: how busy the machine was), or the load average alone."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client (default 200)")
    parser.add_argument("--idle", type=int, default=50, help="sequential requests for the idle latency (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 clients x 3 requests, writes nothing")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    backbone, size = ("test_efficientnet", (64, 48)) if args.smoke else ("efficientnet_lite0", (192, 144))
    if args.smoke:
        args.clients, args.requests, args.idle = 2, 3, 3

    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DERMCAM_HOME"] = str(Path(tmp) / "home")
        ckpt = make_checkpoint(backbone, size)
        images = load_images(8 if args.smoke else 200)
        rows = [measure(ckpt, name, options + threads, images, args.clients, args.requests, args.idle)
                for name, options in CONFIGS]
    batched, unbatched = rows
    extra = {"backbone": backbone, "input_size": list(size), "real_images": LITE.exists() and not args.smoke,
             "server_threads": args.threads or "torch default",
             "batched_vs_unbatched_throughput": batched["load_img_s"] / unbatched["load_img_s"],
             "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "uptime_before": before, "uptime_after": uptime()}
    if args.smoke:
        print(json.dumps({"rows": rows, **extra}))
        return
    report("serve", rows, extra)


if __name__ == "__main__":
    main()
