"""Training input: cache rows -> augmented, normalised batches on the device, in the epoch's order.

Two paths compute the same batches, so that which one runs never changes what a run learns beyond
floating-point rounding:

- **CPU** (the synchronous path): read the rows from the memory-mapped cache, convert to float,
  apply the colour constancy the run records (:func:`dermcam.data.geometry.color_constancy`; none
  by default), augment, resize and normalise, all in the training loop's thread. This is exactly the
  arithmetic dermcam always did, in the same order, so CPU runs stay bit-identical and resume exactly. A helper
  thread would not pay here: on a laptop's few cores it would only compete with torch's own threads.
- **Device** (CUDA): a background thread reads the *next* batch's uint8 rows from the memmap and
  pins them while the current step runs (one batch ahead, so memory stays bounded); the loop thread
  then copies them with ``non_blocking=True`` and converts, augments, resizes and normalises on the
  GPU. Moving uint8 rather than float32 also moves a quarter of the bytes.

On both paths every random choice is drawn exactly as before: :func:`~dermcam.train.augment.draw_augment`
on the CPU with ``batch_generator(seed, epoch, b)``, for the whole *global* batch, then sliced to this
rank's part (:meth:`dermcam.train.distributed.DistContext.shard`). A batch is therefore a pure function
of ``(order, epoch, b)``, whichever path, thread or number of processes computed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from dermcam.train.augment import AugmentDraw

# (images (B, 3, h, w) float, labels (B,) int64, extras), on the device. ``extras`` maps a name to this
# batch's rows of each per-image array the pipeline was given (patient metadata for the model, a
# teacher's soft targets for the loss); empty when there are none.
Batch = tuple["torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class HostBatch:
    """One batch as the device path reads it on the host: this rank's uint8 rows (pinned for a GPU),
    their labels, their augmentation draw (None without ``augment``) and their rows of the extras."""

    pixels: torch.Tensor  # (B, H, W, 3) uint8
    labels: torch.Tensor  # (B,)
    draw: AugmentDraw | None
    extras: dict[str, torch.Tensor]


class BatchPipeline:
    """Turns the epoch's image order into training batches on ``device``; see the module docstring.

    ``images`` is the (memory-mapped) uint8 NHWC cache, ``rows``/``labels`` the train split's cache
    rows and labels, ``shard`` maps a global batch length to this rank's slice of it. ``on_device``
    picks the path: None (the default) means the device path exactly when ``device`` is CUDA; tests
    pass True to run the device path's logic on the CPU. ``extras``: per-image arrays aligned with
    ``rows`` (first axis), batched alongside the labels and untouched by augmentation.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 preprocessing: Mapping[str, Any], augment: bool, seed: int, device: Any,
                 channels_last: bool, shard: Callable[[int], slice] = lambda n: slice(0, n),
                 on_device: bool | None = None, extras: Mapping[str, np.ndarray] | None = None) -> None:
        self.images, self.rows, self.labels = images, rows, labels
        self.extras = dict(extras or {})
        for name, values in self.extras.items():
            if len(values) != len(rows):
                raise ValueError(f"extra '{name}' has {len(values)} rows for {len(rows)} images")
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self.size = (int(preprocessing["input_size"][-2]), int(preprocessing["input_size"][-1]))  # (h, w)
        self.mean: Sequence[float] = list(preprocessing["mean"])
        self.std: Sequence[float] = list(preprocessing["std"])
        self.preprocessing = dict(preprocessing)  # geometry.color_constancy reads its setting from it
        self.device, self.channels_last, self.shard = device, channels_last, shard
        self.on_device = device.type == "cuda" if on_device is None else on_device
        self.pin = device.type == "cuda"  # pinned memory needs CUDA; the forced path on a CPU skips it
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- one batch -------------------------------------------------------------------------------------

    def _picks(self, order: np.ndarray, b: int) -> tuple[np.ndarray, slice]:
        """The global batch ``b`` (positions in the train split) and this rank's slice of it."""
        picks = order[b * self.batch_size:(b + 1) * self.batch_size]
        return picks, self.shard(len(picks))

    def _draw(self, n: int, epoch: int, b: int, mine: slice) -> AugmentDraw:
        """Batch ``b``'s augmentation, drawn for the whole global batch of ``n`` and sliced to this rank."""
        from dermcam.train.augment import batch_generator, draw_augment

        h, w = self.images.shape[1:3]
        return draw_augment(n, w / h, batch_generator(self.seed, epoch, b))[mine]

    def cpu_batch(self, order: np.ndarray, epoch: int, b: int) -> Batch:
        """The synchronous path: every operation in the order dermcam always used (bit-identical)."""
        import torch

        from dermcam.data.geometry import color_constancy, normalize, resize, to_float
        from dermcam.train.augment import apply_augment

        picks, mine = self._picks(order, b)
        x = color_constancy(to_float(self.images[self.rows[picks[mine]]]), self.preprocessing)
        if self.augment:  # drawn for the whole global batch, applied to this rank's slice
            x = apply_augment(x, self.size, self._draw(len(picks), epoch, b, mine))
        else:
            x = resize(x, self.size)
        x = normalize(x, self.mean, self.std).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(self.labels[picks[mine]]).to(self.device), self._extras(picks[mine], self.device)

    def _extras(self, positions: np.ndarray, device: Any = None) -> dict[str, torch.Tensor]:
        """This batch's rows of each extra array, as tensors (on ``device`` when given)."""
        import torch

        out = {name: torch.from_numpy(np.ascontiguousarray(values[positions])) for name, values in self.extras.items()}
        return {name: t.to(device) for name, t in out.items()} if device is not None else out

    def read(self, order: np.ndarray, epoch: int, b: int) -> HostBatch:
        """The device path's host half (the prefetch thread runs it): read the rows from the memmap,
        draw the augmentation, and pin all of it so the copies can overlap with GPU work."""
        import torch

        from dermcam.train.augment import AugmentDraw

        picks, mine = self._picks(order, b)
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[self.rows[picks[mine]]]))
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[picks[mine]]))
        draw = self._draw(len(picks), epoch, b, mine) if self.augment else None
        extras = self._extras(picks[mine])
        if self.pin:
            pixels, labels = pixels.pin_memory(), labels.pin_memory()
            extras = {name: t.pin_memory() for name, t in extras.items()}
            if draw is not None:
                draw = AugmentDraw(draw.theta.pin_memory(), None if draw.color is None else draw.color.pin_memory())
        return HostBatch(pixels, labels, draw, extras)

    def to_device(self, host: HostBatch) -> Batch:
        """The device path's device half: copy (asynchronously from pinned memory), then convert,
        augment or resize, and normalise on the device, with the CPU path's formulas."""
        import torch

        from dermcam.data.geometry import color_constancy, resize
        from dermcam.train.augment import AugmentDraw, apply_augment

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=self.pin)

        # geometry.to_float on the device: NHWC uint8 -> NCHW float in [0, 1]
        x = move(host.pixels).permute(0, 3, 1, 2).float().div_(255.0)
        x = color_constancy(x, self.preprocessing)  # at the cache size, before augmentation, as batch_input
        if host.draw is not None:
            draw = AugmentDraw(move(host.draw.theta), None if host.draw.color is None else move(host.draw.color))
            x = apply_augment(x, self.size, draw)
        else:
            x = resize(x, self.size)
        mean, std = self._mean_std()
        x = (x - mean) / std  # geometry.normalize, with its constants kept on the device
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, move(host.labels), {name: move(t) for name, t in host.extras.items()}

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation constants made once: building them per batch would be a blocking copy that
        makes the CPU wait for the GPU every step."""
        import torch

        if self._norm is None:
            mean, std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
                         for v in (self.mean, self.std))
            self._norm = (mean, std)
        return self._norm

    def batch(self, order: np.ndarray, epoch: int, b: int) -> Batch:
        """Batch ``b`` of ``epoch``, computed now on this thread, by whichever path this pipeline uses."""
        if self.on_device:
            return self.to_device(self.read(order, epoch, b))
        return self.cpu_batch(order, epoch, b)

    # -- an epoch --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def epoch(self, order: np.ndarray, epoch: int, count: int) -> Iterator[Iterator[Batch]]:
        """The first ``count`` batches of ``epoch`` in ``order``, as ``with pipeline.epoch(...) as batches``.

        A context manager rather than a bare generator so that the prefetch thread is joined when the
        block ends, also when the loop raises or is interrupted: a generator left suspended would keep
        its thread (and a pinned batch) alive until garbage collection.
        """
        batches = self._prefetched(order, epoch, count) if self.on_device else \
            (self.cpu_batch(order, epoch, b) for b in range(count))
        try:
            yield batches
        finally:
            batches.close()

    def _prefetched(self, order: np.ndarray, epoch: int, count: int) -> Iterator[Batch]:
        """Device path: batch ``b + 1`` is read on a helper thread while batch ``b`` trains."""
        from concurrent.futures import ThreadPoolExecutor
        from functools import partial

        if count <= 0:
            return
        start = None
        if self.pin and self.device.index is not None:  # pin for this GPU, not open a context on GPU 0
            import torch

            start = partial(torch.cuda.set_device, self.device.index)
        with ThreadPoolExecutor(1, thread_name_prefix="dermcam-prefetch", initializer=start) as pool:
            pending = pool.submit(self.read, order, epoch, 0)
            try:
                for b in range(count):
                    host = pending.result()
                    if b + 1 < count:
                        pending = pool.submit(self.read, order, epoch, b + 1)
                    yield self.to_device(host)
            finally:
                pending.cancel()  # not started yet: skip it; running: the pool's exit waits for it
