"""Class probabilities for rows of a prepared set's cache, batched, on any device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dermcam.models.device import autocast
from dermcam.progress import Progress


def batches(rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def _metadata_batch(metadata: np.ndarray | Sequence[np.ndarray | None] | None, part: slice,
                    device: Any) -> tuple[Any, ...]:
    """The extra model arguments for one batch: ``()`` without metadata, else ``(meta,)`` with this
    batch's rows as a tensor on ``device`` (an ensemble: a list with one tensor or None per member)."""
    import torch

    def rows(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values[part], dtype=np.float32)).to(device)

    if metadata is None:
        return ()
    if isinstance(metadata, np.ndarray):
        return (rows(metadata),)
    return ([None if m is None else rows(m) for m in metadata],)


def predict(model: Any, images: np.ndarray, rows: np.ndarray, *, preprocessing: Mapping[str, Any], device: Any,
            precision: str = "fp32", batch_size: int = 64, tta: bool = False, channels_last: bool = False,
            compile: bool = False, notes: list[str] | None = None, progress: Progress | None = None,
            description: str = "predict", heads: int = 1,
            metadata: np.ndarray | Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Class probabilities (N, K) for cache rows ``rows`` of ``images``, seen through a checkpoint's
    ``preprocessing`` (:func:`dermcam.data.geometry.batch_input`); ``tta`` averages over flips.
    ``heads``: the model's output is that many blocks of K logits side by side (an ensemble's
    reported and raw view, :class:`dermcam.models.ensemble.WithRaw`), each softmaxed on its own.

    ``compile``: run the model through torch.compile; when that is unavailable or fails (also at a
    later batch, where a new shape recompiles) the eager model takes over and the one-line reason is
    appended to ``notes``.

    ``metadata``: the encoded patient metadata of the rows (:func:`dermcam.data.metadata.model_metadata`),
    aligned with ``rows``: an (N, D) array for a metadata model, or for an ensemble one array (or None)
    per member; each batch passes its rows of it as ``model(x, meta)``. None: the model is called as
    ``model(x)`` (a metadata model then sees "nothing known").
    """
    import torch

    from dermcam.data.geometry import batch_input, flips
    from dermcam.models.compile import compile_failed_note, maybe_compile

    for values in [metadata] if isinstance(metadata, np.ndarray) else list(metadata or []):
        if values is not None and len(values) != len(rows):
            raise ValueError(f"metadata has {len(values)} rows for {len(rows)} images")
    forward, note = maybe_compile(model, compile)

    progress = progress or Progress()
    was_training = model.training
    model.eval()
    out = []
    progress.start(description, total=len(rows))
    try:
        with torch.inference_mode(), autocast(device, precision):
            for start, chunk in zip(range(0, len(rows), batch_size), batches(np.asarray(rows), batch_size)):
                x = batch_input(images[chunk], preprocessing, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                views = flips(x) if tta else [x]
                extra = _metadata_batch(metadata, slice(start, start + len(chunk)), x.device)
                try:
                    outputs = [forward(v, *extra) for v in views]
                except Exception as exc:  # noqa: BLE001 - only a compiled forward is retried, eagerly
                    if forward is model:
                        raise
                    forward, note = model, compile_failed_note(exc)
                    outputs = [model(v, *extra) for v in views]
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


def calibrated_outputs(model: Any, sidecar: Mapping[str, Any], images: np.ndarray, rows: np.ndarray, *,
                       calibrated: bool = True, **options: Any) -> tuple[Any, np.ndarray]:
    """Cache rows -> the model's outputs as every scoring command reports them, and its raw softmax.

    The one path from a loaded model to decisions, so an image scored by ``evaluate`` and by ``audit``
    gets the same answer: an ensemble's members calibrate inside it, so one pass through
    :class:`~dermcam.models.ensemble.WithRaw` gives its reported and its raw view; a checkpoint's raw
    softmax is what :func:`predict` returns, and :func:`~dermcam.evaluate.operating.model_outputs`
    calibrates it and applies its operating point. ``options`` go to :func:`predict` as they are.
    """
    from dermcam.evaluate.operating import model_outputs

    k = len(sidecar["classes"])
    inside = sidecar.get("kind") == "ensemble" and calibrated
    if inside:
        from dermcam.models.ensemble import WithRaw

        model = WithRaw(model)
    scores = predict(model, images, rows, preprocessing=sidecar["preprocessing"], heads=2 if inside else 1,
                     **options)
    reported, raw = (scores[:, :k], scores[:, k:]) if inside else (scores, scores)
    return model_outputs(reported, sidecar, calibrated=calibrated), raw
