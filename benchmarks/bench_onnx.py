"""CPU inference: ONNX Runtime on an exported ``.onnx`` file against PyTorch on the same graph.

Both run the graph ``dermcam ckpt export --format onnx`` writes (cache-sized uint8 pixels in: resize,
normalisation, network, softmax, temperature scaling), built by dermcam.deploy.onnx_export, so the
numbers compare the runtimes and nothing else. ``pytorch_model_img_s`` times the bare network on an
already prepared float input (what evaluate and explain run). Random weights: speed does not depend
on them. Each figure is the best of ``--rounds`` rounds of at least ``--seconds`` seconds each, after
warm-up runs; both runtimes use every CPU the machine reports (intra-op threads).

    python benchmarks/bench_onnx.py                       # efficientnet_lite0, 192x144, batch 1 and 32
    python benchmarks/bench_onnx.py --backbone convnext_tiny --image-size 224
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from _common import peak_rss_mib, report


def images_per_second(run: Callable[[], object], batch: int, seconds: float, rounds: int) -> float:
    """Best over ``rounds`` of images/s, each round repeating ``run`` for at least ``seconds``."""
    for _ in range(3):
        run()
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or count < 3:
            run()
            count += 1
        best = max(best, count * batch / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", default="192x144", help="model input WIDTHxHEIGHT")
    parser.add_argument("--cache-size", default="256x192", help="the graph's input (image cache) WIDTHxHEIGHT")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum duration of one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime
    import torch

    from dermcam.data.geometry import parse_size
    from dermcam.deploy.onnx_export import InferenceGraph, example_pixels, onnx_bytes
    from dermcam.models.backbones import build_model, data_config

    width, height = parse_size(args.image_size)
    cache = parse_size(args.cache_size, "--cache-size")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(args.backbone, 7).eval()
    cfg = data_config(model)
    preprocessing = {"input_size": [3, height, width], "mean": cfg["mean"], "std": cfg["std"],
                     "cache_size": list(cache)}
    graph = InferenceGraph(model, preprocessing, {"method": "temperature", "temperature": 1.5})
    data = onnx_bytes(graph, preprocessing, "{}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    rows = []
    for batch in args.batches:
        pixels = example_pixels(preprocessing, batch)
        feed = {"image": pixels.numpy()}
        x = torch.randn(batch, 3, height, width)
        with torch.inference_mode():
            torch_graph = images_per_second(lambda p=pixels: graph(p), batch, args.seconds, args.rounds)
            torch_model = images_per_second(lambda x=x: model(x), batch, args.seconds, args.rounds)
        ort = images_per_second(lambda f=feed: session.run(None, f), batch, args.seconds, args.rounds)
        rows.append({"backbone": args.backbone, "input": f"{width}x{height}", "batch": batch,
                     "onnxruntime_img_s": ort, "pytorch_graph_img_s": torch_graph,
                     "pytorch_model_img_s": torch_model, "ort_speedup": ort / torch_graph})
    report("onnx", rows, {"threads": threads, "onnxruntime": onnxruntime.__version__, "onnx_bytes": len(data),
                          "cache_size": list(cache), "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
