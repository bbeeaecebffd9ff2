"""Predicting on a prepared split and evaluating a checkpoint, shared by ``train`` and ``evaluate``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermcam.errors import BadInputError
from dermcam.progress import Progress


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast where asked for; a no-op context for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(requested: str, device: Any) -> str:
    """``auto``: bf16 on CUDA cards and CPUs that support it (AMX/AVX512-BF16), else fp16 (CUDA) / fp32."""
    import torch

    from dermcam.models import cpu_supports_bf16

    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision must be auto, bf16, fp16 or fp32, not '{requested}'")
    if requested == "fp16" and device.type != "cuda":
        raise BadInputError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def batches(rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def predict(model: Any, images: np.ndarray, rows: np.ndarray, *, input_size: Sequence[int],
            mean: Sequence[float], std: Sequence[float], device: Any, precision: str = "fp32",
            batch_size: int = 64, tta: bool = False, channels_last: bool = False,
            progress: Progress | None = None, description: str = "predict") -> np.ndarray:
    """Class probabilities (N, K) for cache rows ``rows``; ``tta`` averages over flips."""
    import torch

    from dermcam.augment import flips, normalize, resize, to_float

    progress = progress or Progress()
    size = (int(input_size[-2]), int(input_size[-1]))
    was_training = model.training
    model.eval()
    out = []
    progress.start(description, total=len(rows))
    try:
        with torch.inference_mode(), autocast(device, precision):
            for chunk in batches(np.asarray(rows), batch_size):
                x = normalize(resize(to_float(images[chunk]), size), mean, std)
                x = x.to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                views = flips(x) if tta else [x]
                probs = torch.stack([model(v).float().softmax(dim=1) for v in views]).mean(dim=0)
                out.append(probs.cpu().numpy())
                progress.advance(len(chunk))
    finally:
        progress.finish()
        model.train(was_training)
    k = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.float32)


@dataclass
class EvalResult:
    checkpoint_id: str
    dataset: str
    split: str
    metrics: dict[str, Any]
    classes: list[str]
    report_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def evaluate(ref: str | Path | None = None, *, split: str = "test", dataset: str | None = None,
             tta: bool = False, device: str = "auto", precision: str = "auto", batch_size: int = 64,
             out_dir: Path | None = None, root: Path | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split of its data set (or of ``dataset``) and write a report."""
    from dermcam.checkpoints import load_for_inference
    from dermcam.data import load_prepared
    from dermcam.metrics import compute_metrics
    from dermcam.models import select_device
    from dermcam.report import write_report

    if split not in ("train", "val", "test"):
        raise BadInputError(f"--split must be train, val or test, not '{split}'")
    model, sidecar = load_for_inference(ref, root)
    data = load_prepared(dataset or sidecar.get("dataset", {}).get("name"), root)
    warnings = []
    if list(data.classes) != list(sidecar["classes"]):
        raise BadInputError(f"data set '{data.name}' has classes {data.classes} but checkpoint "
                            f"{sidecar['id']} was trained on {sidecar['classes']}")
    trained_on = sidecar.get("dataset", {}).get("fingerprint")
    if trained_on and trained_on != data.fingerprint:
        warnings.append(f"data set '{data.name}' changed since checkpoint {sidecar['id']} was trained "
                        "(fingerprints differ): its splits may overlap the training data")
    dev = select_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    rows, labels = data.split(split)
    pre = sidecar["preprocessing"]
    probs = predict(model, data.images, rows, input_size=pre["input_size"], mean=pre["mean"], std=pre["std"],
                    device=dev, precision=prec, batch_size=batch_size, tta=tta, progress=progress,
                    description=f"evaluate {split}")
    metrics = compute_metrics(labels, probs, sidecar["classes"])
    metrics["tta"] = tta
    report_dir = out_dir
    files: list[Path] = []
    if report_dir is not None:
        files = write_report(report_dir, metrics, sidecar["classes"], title=f"{sidecar['id']} on {data.name}/{split}")
    return EvalResult(sidecar["id"], data.name, split, metrics, list(sidecar["classes"]), report_dir, files, warnings)
