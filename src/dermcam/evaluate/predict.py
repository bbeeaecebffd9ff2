"""Class probabilities for rows of a prepared set's cache, batched, on any device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from dermcam.models.device import autocast
from dermcam.progress import Progress


def batches(rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def predict(model: Any, images: np.ndarray, rows: np.ndarray, *, preprocessing: Mapping[str, Any], device: Any,
            precision: str = "fp32", batch_size: int = 64, tta: bool = False, channels_last: bool = False,
            compile: bool = False, notes: list[str] | None = None, progress: Progress | None = None,
            description: str = "predict", heads: int = 1) -> np.ndarray:
    """Class probabilities (N, K) for cache rows ``rows`` of ``images``, seen through a checkpoint's
    ``preprocessing`` (:func:`dermcam.data.geometry.batch_input`); ``tta`` averages over flips.
    ``heads``: the model's output is that many blocks of K logits side by side (an ensemble's
    reported and raw view, :class:`dermcam.models.ensemble.WithRaw`), each softmaxed on its own.

    ``compile``: run the model through torch.compile; when that is unavailable or fails (also at a
    later batch, where a new shape recompiles) the eager model takes over and the one-line reason is
    appended to ``notes``.
    """
    import torch

    from dermcam.data.geometry import batch_input, flips
    from dermcam.models.compile import compile_failed_note, maybe_compile

    forward, note = maybe_compile(model, compile)

    progress = progress or Progress()
    was_training = model.training
    model.eval()
    out = []
    progress.start(description, total=len(rows))
    try:
        with torch.inference_mode(), autocast(device, precision):
            for chunk in batches(np.asarray(rows), batch_size):
                x = batch_input(images[chunk], preprocessing, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                views = flips(x) if tta else [x]
                try:
                    outputs = [forward(v) for v in views]
                except Exception as exc:  # noqa: BLE001 - only a compiled forward is retried, eagerly
                    if forward is model:
                        raise
                    forward, note = model, compile_failed_note(exc)
                    outputs = [model(v) for v in views]
                probs = torch.stack([o.float().unflatten(1, (heads, -1)).softmax(dim=2).flatten(1)
                                     for o in outputs]).mean(dim=0)
                out.append(probs.cpu().numpy())
                progress.advance(len(chunk))
    finally:
        progress.finish()
        model.train(was_training)
        if note and notes is not None:
            notes.append(note)
    k = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.float32)
