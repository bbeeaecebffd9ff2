"""Does ``--compile`` (torch.compile) pay on this CPU? A training step and a prediction batch, eager vs compiled.

    python benchmarks/bench_compile_cpu.py [--backbone efficientnet_lite0] [--size 192x144] [--steps 8]

Random weights (no hub needed), the trainer's precision rule (bf16 autocast only where the CPU has it
natively), channels_last. Reports the first compiled call (compile time included), then steady-state
img/s for each, so the break-even is visible: how many steps the compile time takes to earn back.
Run it alone on the machine (see DEVELOPERS.md). Results: benchmarks/results/compile_cpu.json.
"""

from __future__ import annotations

import argparse

from _common import report, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", default="192x144")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    from dermcam.data.geometry import parse_size
    from dermcam.models.backbones import build_model
    from dermcam.models.compile import maybe_compile
    from dermcam.models.device import autocast, resolve_precision

    width, height = parse_size(args.size)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    rows = []
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        model = build_model(args.backbone, 3).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_model, note = maybe_compile(model, mode == "compile")
        x = torch.randn(args.batch, 3, height, width).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (args.batch,))

        def step() -> None:
            with autocast(device, precision):
                loss = torch.nn.functional.cross_entropy(train_model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        first = timed(step, 1, warmup=False)  # compiling included
        step_s = timed(step, args.steps, warmup=False)  # the first call was the warm-up
        model.eval()

        def predict() -> None:
            with torch.inference_mode():
                train_model(x).float().softmax(1)

        first_predict = timed(predict, 1, warmup=False)
        predict_s = timed(predict, args.steps, warmup=False)
        rows.append({"mode": mode, "precision": precision, "note": note, "first_train_step_s": first,
                     "train_img_s": args.batch / step_s, "first_predict_s": first_predict,
                     "predict_img_s": args.batch / predict_s})
    eager, compiled = rows
    for key in ("train", "predict"):
        gain = eager[f"{key}_img_s"] and compiled[f"{key}_img_s"] / eager[f"{key}_img_s"]
        compiled[f"{key}_speedup"] = gain
    report("compile_cpu", rows, {"backbone": args.backbone, "size": args.size, "batch": args.batch,
                                 "steps": args.steps})


if __name__ == "__main__":
    main()
