"""How fast is ``dermcam explain`` on CPU, and how does its Grad-CAM compare with pytorch-grad-cam?

For efficientnet_lite0 and convnext_tiny (random weights: weights do not change speed; 224x224
input), in one run:

- ``cli_1img_s``: wall time of one ``dermcam explain IMAGE`` subprocess, end to end (Python and torch
  start-up, checkpoint load and hash check, decode, Grad-CAM, overlay PNG, sidecar); median of runs.
- ``explain_img_s``: images/s of one library call :func:`dermcam.explain.explain` over the folder,
  everything included (checkpoint load and hash check, decode, preprocessing, CAM, render, writes),
  after a warm-up call so imports and oneDNN set-up are not counted.
- ``ours_cam_img_s`` / ``pgc_cam_img_s``: images/s of the Grad-CAM computation alone, dermcam.cam vs
  pytorch-grad-cam (``grad-cam`` package) on the same model, layer, tensors and batch size, plus the
  largest difference between their maps (they implement the same conventions).

Images are real HAM10000-lite JPEGs when ../shared/data/ham10000-lite exists, otherwise random ones.

    python benchmarks/bench_explain.py             # writes benchmarks/results/explain.json
    python benchmarks/bench_explain.py --images 8  # quicker, noisier
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LITE, peak_rss_mib, report  # noqa: E402
from dermcam.explain.pipeline import BATCH_SIZE as BATCH

BACKBONES = ("efficientnet_lite0", "convnext_tiny")


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs in ``folder``: real lesions when available (200x150), else random 600x450."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    real = sorted((LITE / "HAM10000_images_part_1").glob("*.jpg"))[:count] if LITE.exists() else []
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.jpg"
        if i < len(real):
            path.write_bytes(real[i].read_bytes())
        else:
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_checkpoint(backbone: str) -> str:
    """A store checkpoint of ``backbone`` with random weights and its timm preprocessing; its id."""
    import torch

    from dermcam.models.backbones import build_model, data_config
    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    model = build_model(backbone, 3)
    run = create_run({"backbone": backbone})
    cfg = data_config(model)
    sidecar = {"backbone": backbone, "classes": ["nv", "bkl", "mel"],
               "preprocessing": {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation")},
               "metrics": {}, "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.0}}
    return save_checkpoint(run, epoch=0, model_state=model.state_dict(), sidecar=sidecar).id


def time_cli(ckpt_id: str, image: Path, out: Path, repeats: int) -> float:
    """Median wall seconds of ``dermcam explain IMAGE`` in a fresh interpreter."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dermcam", "explain", str(image), "--checkpoint", ckpt_id,
                        "-o", str(out)], check=True, capture_output=True, env=os.environ.copy())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_library(ckpt_id: str, images: list[Path], out: Path) -> float:
    """images/s of one dermcam.explain.explain call over the folder, after a one-image warm-up call."""
    from dermcam.explain.pipeline import explain

    explain([images[0]], checkpoint=ckpt_id, out_dir=out)
    start = time.perf_counter()
    report_ = explain([images[0].parent], checkpoint=ckpt_id, out_dir=out)
    elapsed = time.perf_counter() - start
    assert not report_.failures
    return len(images) / elapsed


def time_cam_only(ckpt_id: str, images: list[Path], repeats: int) -> tuple[float, float, float]:
    """(ours images/s, pytorch-grad-cam images/s, max |difference| of their maps) on the same batches."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from dermcam.data.geometry import cache_size, model_input
    from dermcam.data.images import decode_image
    from dermcam.explain.methods import GradCAM
    from dermcam.models.layers import find_target_layer
    from dermcam.store.inference import load_for_inference

    model, sidecar = load_for_inference(ckpt_id)
    layer = find_target_layer(model)
    size = cache_size(sidecar["preprocessing"])
    x = torch.stack([model_input(decode_image(p, size)[0], sidecar["preprocessing"]) for p in images])
    batches = list(x.split(BATCH))
    ours = GradCAM(model, layer)
    targets = [ours(b).targets for b in batches]  # warm-up, and the classes both will explain

    def run_ours() -> list[np.ndarray]:
        return [ours(b, t).maps for b, t in zip(batches, targets)]

    def run_reference() -> list[np.ndarray]:
        with ReferenceGradCAM(model, [model.get_submodule(layer)]) as cam:
            return [cam(b, [ClassifierOutputTarget(c) for c in t]) for b, t in zip(batches, targets)]

    run_reference()  # warm-up
    maps: dict[str, list[np.ndarray]] = {}
    elapsed: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, fn in (("ours", run_ours), ("reference", run_reference)):
            start = time.perf_counter()
            maps[name] = fn()
            elapsed[name].append(time.perf_counter() - start)
    rate = {name: len(images) / statistics.median(times) for name, times in elapsed.items()}
    diff = max(float(np.abs(a - b).max()) for a, b in zip(maps["ours"], maps["reference"]))
    return rate["ours"], rate["reference"], diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images per batch measurement (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    args = parser.parse_args()

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DERMCAM_HOME"] = str(Path(tmp) / "home")
        images = make_images(Path(tmp) / "images", args.images)
        for backbone in BACKBONES:
            ckpt_id = make_checkpoint(backbone)
            cli_s = time_cli(ckpt_id, images[0], Path(tmp) / "cli", args.repeats)
            lib_rate = time_library(ckpt_id, images, Path(tmp) / f"lib-{backbone}")
            ours, reference, diff = time_cam_only(ckpt_id, images, args.repeats)
            rows.append({"backbone": backbone, "cli_1img_s": cli_s, "explain_img_s": lib_rate,
                         "ours_cam_img_s": ours, "pgc_cam_img_s": reference, "speedup": ours / reference,
                         "max_map_diff": diff, "peak_rss_mib": peak_rss_mib()})
    report("explain", rows, {"images": args.images, "batch": BATCH, "repeats": args.repeats,
                             "real_images": LITE.exists(), "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
