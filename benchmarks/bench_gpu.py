"""GPU throughput: does the training loop keep the GPU busy, and what do evaluate, explain and torch.compile give?

    python benchmarks/bench_gpu.py                     # writes benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --no-compile        # eager rows only (quicker: no compile warm-up)
    python benchmarks/bench_gpu.py --backbones efficientnet_b0 --batch-size 64
    python benchmarks/bench_gpu.py --smoke             # the same code on the CPU, tiny: does it run?

CUDA only: without a CUDA device it says so in one line and exits 0 without writing results.
``--smoke`` runs every step on the CPU with a tiny model, tiny images and a few steps, prints the rows
and writes nothing: it checks the script itself (tests/test_benchmarks.py runs it), so that a session
that gets a GPU for a few minutes does not spend them on a bug here. Offline:
the images are a synthetic HAM10000-like set (dermcam.data.synthetic) prepared into a temporary store
with the default cache, and the models have random weights (``pretrained="none"``; weights do not
change speed). For each backbone (default convnext_tiny and efficientnet_b0) at 224x224, bf16
autocast, channels_last, first eager and then with ``--compile``:

- ``bare_img_s``: the bare model step, :meth:`Trainer.forward_backward` + the AdamW step on one fixed
  batch already on the GPU (what the loop would reach with a free data pipeline);
- ``loop_img_s``: the real training loop, :meth:`Trainer.train_one_epoch` over whole epochs (memmap
  read and pinning on the prefetch thread, non-blocking copy, augmentation on the GPU, the step);
  ``loop_vs_bare`` is their ratio, the goal is >= 0.9;
- ``peak_train_mib``: ``torch.cuda.max_memory_allocated`` over those training steps;
- ``evaluate_img_s``: :func:`dermcam.evaluate.predict.predict` over every cached image (batch
  ``--eval-batch``, bf16 autocast; ``dermcam evaluate`` scores in fp32 unless asked), its CPU-side
  preprocessing included, as ``dermcam evaluate`` runs it;
- ``explain_img_s``: :func:`dermcam.explain.methods.compute_cam` (Grad-CAM) on a batch of
  ``--explain-batch`` images already on the GPU (CAMs run in fp32 by design);
- ``first_epoch_s``: the untimed warm-up epoch, which includes compiling with ``--compile``;
  ``compiled`` says whether the step really ran compiled and ``compile_note`` why not.

Every timing is preceded by a warm-up and bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, report, timed

BACKBONES = ("convnext_tiny", "efficientnet_b0")
SIZE = 224
# --smoke: the same steps on the CPU, as small as they go
SMOKE = {"backbones": ["test_efficientnet"], "batch_size": 8, "steps": 2, "epochs": 1, "lesions": 4,
         "eval_batch": 8, "explain_batch": 4, "explain_repeats": 1, "size": 64, "device": "cpu",
         "precision": "fp32"}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any], repeats: int, device: str = "cuda") -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up call, its GPU work included."""
    return timed(fn, repeats, sync=lambda: sync(device))


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def one_line(exc: BaseException) -> str:
    from dermcam.errors import first_line

    return f"{type(exc).__name__}: {first_line(exc, 300)}"


def prepare_synthetic(lesions: int) -> str:
    """A synthetic set of about ``lesions`` x 3 classes x 2 images, prepared into $DERMCAM_HOME; its name."""
    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(Path(os.environ["DERMCAM_HOME"]).parent / "synthetic",
                                   n_lesions_per_class=lesions, images_per_lesion=(1, 3), seed=0)
    prepare(src, name="synthetic")
    return "synthetic"


def train_rows(backbone: str, compile_: bool, args: argparse.Namespace, dataset: str) -> tuple[Any, dict[str, Any]]:
    """Bare step and training loop of one configuration; the trainer (for the inference rows) and its row."""
    from dermcam.train.config import TrainConfig
    from dermcam.train.schedule import epoch_order
    from dermcam.train.trainer import Trainer

    cfg = TrainConfig(dataset=dataset, backbone=backbone, pretrained="none", image_size=args.size,
                      batch_size=args.batch_size, precision=args.precision, channels_last=True, device=args.device,
                      compile=compile_, epochs=10**6, warmup_epochs=0.0)
    trainer = Trainer(cfg)
    trainer.build()
    start = time.perf_counter()
    trainer.train_one_epoch()  # warm-up: cuDNN autotuning, allocator, and compiling with --compile
    sync(args.device)
    first_epoch_s = time.perf_counter() - start
    trainer.model.train()
    reset_peak(args.device)
    order = epoch_order(len(trainer.train_rows), trainer.train_labels, cfg.seed, 0, cfg.balance, len(trainer.classes))
    fixed = trainer.make_batch(order, 0)

    def bare() -> None:
        trainer.forward_backward(*fixed)
        trainer._optimizer_step()

    def epoch() -> None:
        trainer.epoch += 1
        trainer.train_one_epoch()

    t_bare = synced(bare, args.steps, args.device)
    t_epoch = synced(epoch, args.epochs, args.device)
    images_per_epoch = trainer.batches_per_epoch * cfg.batch_size
    row = {"backbone": backbone, "compile": compile_, "compiled": trainer.train_model is not trainer.eager_model,
           "batch": cfg.batch_size, "size": args.size, "precision": args.precision,
           "bare_img_s": cfg.batch_size / t_bare, "loop_img_s": images_per_epoch / t_epoch,
           "loop_vs_bare": (images_per_epoch / t_epoch) / (cfg.batch_size / t_bare),
           "peak_train_mib": peak_mib(args.device), "first_epoch_s": first_epoch_s,
           "batches_per_epoch": trainer.batches_per_epoch, "compile_note": trainer.compile_note}
    return trainer, row


def inference_rows(trainer: Any, compile_: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate and explain img/s with the trained model, compiled the same way as the training step."""
    import numpy as np
    import torch

    from dermcam.data.geometry import batch_input
    from dermcam.evaluate.predict import predict
    from dermcam.explain.methods import compute_cam
    from dermcam.models.compile import maybe_compile
    from dermcam.models.layers import find_target_layer

    out: dict[str, Any] = {}
    model = trainer.model.eval()
    rows = np.arange(len(trainer.data.images))
    pre = trainer.preprocessing
    scored, note = maybe_compile(model, compile_)

    def evaluate() -> None:
        predict(scored, trainer.data.images, rows, preprocessing=pre, device=trainer.device,
                precision=args.precision, batch_size=args.eval_batch, channels_last=True)

    try:
        reset_peak(args.device)
        out["evaluate_img_s"] = len(rows) / synced(evaluate, 1, args.device)
        out["peak_eval_mib"] = peak_mib(args.device)
    except Exception as exc:  # noqa: BLE001 - a compile failure at the first call: recorded, not fatal
        out["evaluate_error"] = one_line(exc)
    x = batch_input(trainer.data.images[rows[:args.explain_batch]], pre).to(trainer.device)
    x = x.contiguous(memory_format=torch.channels_last)
    layer = find_target_layer(model)
    target = layer if scored is model else f"_orig_mod.{layer}"  # torch.compile's wrapper adds the prefix

    def explain() -> None:
        compute_cam(scored, x, "gradcam", target_layer=target)

    try:
        reset_peak(args.device)
        out["explain_img_s"] = len(x) / synced(explain, args.explain_repeats, args.device)
        out["peak_explain_mib"] = peak_mib(args.device)
    except Exception as exc:  # noqa: BLE001 - as above
        out["explain_error"] = one_line(exc)
    if note:
        out["inference_compile_note"] = note
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps (default 20)")
    parser.add_argument("--epochs", type=int, default=3, help="timed loop epochs after a warm-up one (default 3)")
    parser.add_argument("--lesions", type=int, default=200,
                        help="synthetic lesions per class, 1-3 images each (default 200: about 1200 images, "
                             "about 6 batches of 128 per epoch)")
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--explain-batch", type=int, default=64)
    parser.add_argument("--explain-repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="only the eager rows")
    parser.add_argument("--only-compile", action="store_true", help="only the --compile rows")
    parser.add_argument("--smoke", action="store_true",
                        help="run every step on the CPU, tiny, print the rows, write nothing")
    args = parser.parse_args()
    args.size, args.device, args.precision = SIZE, "cuda", "bf16"
    if args.smoke:
        vars(args).update(SMOKE)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"bench_gpu.py: no CUDA device (torch {torch.__version__}); nothing measured, no results written")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="dermcam-bench-gpu-") as tmp:
        os.environ["DERMCAM_HOME"] = str(Path(tmp) / "home")
        dataset = prepare_synthetic(args.lesions)
        for backbone in args.backbones:
            for compile_ in (False,) if args.no_compile else (True,) if args.only_compile else (False, True):
                print(f"{backbone}, compile={compile_} ...", file=sys.stderr, flush=True)
                trainer, row = train_rows(backbone, compile_, args, dataset)
                row.update(inference_rows(trainer, compile_, args))
                row["peak_rss_mib"] = peak_rss_mib()
                rows.append(row)
                del trainer
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    if args.smoke:
        print(json.dumps(rows, default=str))
        return
    report("gpu", rows, {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version(), "images": "synthetic",
                         "lesions_per_class": args.lesions, "timed_steps": args.steps, "timed_epochs": args.epochs})


if __name__ == "__main__":
    main()
