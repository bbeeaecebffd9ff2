"""The training input pipeline (dermcam.train.pipeline): the CPU path computes exactly what training
always computed, the device path (forced onto the CPU here) the same batches, and its prefetch thread
never outlives an epoch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dermcam.train.distributed import DistContext
from dermcam.train.pipeline import BatchPipeline

PRE = {"input_size": [3, 40, 56], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # non-square
BATCH, SEED, EPOCH = 6, 3, 2


def reference_batch(images, rows, labels, order, b, *, epoch, augment, channels_last, shard, device=None,
                    batch_size=BATCH, seed=SEED, preprocessing=PRE):
    """``Trainer.make_batch`` as it was before the pipeline existed, verbatim but for ``self``."""
    from dermcam.data.geometry import normalize, resize, to_float
    from dermcam.train.augment import apply_augment, batch_generator, draw_augment

    device = device or torch.device("cpu")
    size = tuple(preprocessing["input_size"][-2:])
    picks = order[b * batch_size:(b + 1) * batch_size]
    mine = shard(len(picks))
    x = to_float(images[rows[picks[mine]]])
    if augment:
        _, _, h, w = x.shape
        draw = draw_augment(len(picks), w / h, batch_generator(seed, epoch, b))
        x = apply_augment(x, size, draw[mine])
    else:
        x = resize(x, size)
    x = normalize(x, preprocessing["mean"], preprocessing["std"]).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels[picks[mine]]).to(device)


@pytest.fixture
def cache(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A memory-mapped uint8 cache (as load_prepared opens it), train rows, labels and an epoch order."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (30, 48, 64, 3), dtype=np.uint8))
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = rng.permutation(30)[:24]
    labels = rng.integers(0, 3, 24).astype(np.int64)
    return images, rows, labels, rng.permutation(24)


def pipeline(cache, *, augment: bool, channels_last: bool, shard=None, on_device=None):
    images, rows, labels, _ = cache
    shard = shard or DistContext().shard
    return BatchPipeline(images, rows, labels, batch_size=BATCH, preprocessing=PRE, augment=augment, seed=SEED,
                         device=torch.device("cpu"), channels_last=channels_last, shard=shard, on_device=on_device)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dermcam-prefetch")]


SETTINGS = [(True, True, 1, 0), (False, True, 1, 0), (True, False, 1, 0), (True, True, 3, 1), (False, False, 4, 3)]
IDS = ["augment", "no-augment", "contiguous", "rank1-of-3", "no-augment-rank3-of-4"]


@pytest.mark.parametrize("augment, channels_last, world, rank", SETTINGS, ids=IDS)
def test_the_cpu_path_is_bit_identical_to_the_previous_make_batch(cache, augment, channels_last, world, rank) -> None:
    images, rows, labels, order = cache
    shard = DistContext(rank=rank, world_size=world).shard
    pipe = pipeline(cache, augment=augment, channels_last=channels_last, shard=shard)
    assert not pipe.on_device  # a CPU device takes the synchronous path by default
    with pipe.epoch(order, EPOCH, 4) as batches:
        looped = list(batches)
    assert len(looped) == 4
    for b in range(4):
        want_x, want_y = reference_batch(images, rows, labels, order, b, epoch=EPOCH, augment=augment,
                                         channels_last=channels_last, shard=shard)
        for x, y, *_ in (pipe.batch(order, EPOCH, b), looped[b]):
            assert torch.equal(x, want_x) and x.stride() == want_x.stride() and x.dtype == want_x.dtype
            assert torch.equal(y, want_y)
    assert not prefetch_threads()  # the CPU path never starts a thread


@pytest.mark.parametrize("augment, channels_last, world, rank", SETTINGS, ids=IDS)
def test_the_device_path_gives_the_same_batches(cache, augment, channels_last, world, rank) -> None:
    images, rows, labels, order = cache
    shard = DistContext(rank=rank, world_size=world).shard
    pipe = pipeline(cache, augment=augment, channels_last=channels_last, shard=shard, on_device=True)
    with pipe.epoch(order, EPOCH, 4) as batches:
        looped = list(batches)
    assert len(looped) == 4
    for b, (x, y, *_) in enumerate(looped):
        want_x, want_y = reference_batch(images, rows, labels, order, b, epoch=EPOCH, augment=augment,
                                         channels_last=channels_last, shard=shard)
        torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-5)
        assert torch.equal(y, want_y)
        if channels_last:
            assert x.is_contiguous(memory_format=torch.channels_last)
    assert not prefetch_threads()


def test_the_device_path_reads_one_batch_ahead_on_a_helper_thread(cache, monkeypatch) -> None:
    _, _, _, order = cache
    pipe = pipeline(cache, augment=True, channels_last=True, on_device=True)
    reads: list[tuple[int, str]] = []
    original = BatchPipeline.read

    def read(self, order, epoch, b):
        reads.append((b, threading.current_thread().name))
        return original(self, order, epoch, b)

    monkeypatch.setattr(BatchPipeline, "read", read)
    with pipe.epoch(order, EPOCH, 4) as batches:
        for b, _ in enumerate(batches):
            assert len(reads) <= b + 2  # bounded: at most the next batch is read ahead
            assert len(prefetch_threads()) == 1
    assert [b for b, _ in reads] == [0, 1, 2, 3]  # each batch once, in order, nothing past the epoch
    assert all(name.startswith("dermcam-prefetch") for _, name in reads)
    assert not prefetch_threads()


def test_the_prefetch_thread_is_joined_when_the_loop_raises(cache) -> None:
    _, _, _, order = cache
    pipe = pipeline(cache, augment=True, channels_last=True, on_device=True)
    with pytest.raises(RuntimeError, match="step failed"), pipe.epoch(order, EPOCH, 4) as batches:
        for b, _ in enumerate(batches):
            assert prefetch_threads()
            if b == 1:
                raise RuntimeError("step failed")
    assert not prefetch_threads()
    with pipe.epoch(order, EPOCH, 4) as batches:  # leaving the block early (a break) also joins it
        next(iter(batches))
    assert not prefetch_threads()


def test_the_trainer_loop_uses_the_pipeline_and_leaves_no_thread(home: Path, monkeypatch) -> None:
    """A real Trainer on the synthetic set: make_batch is the CPU path, and an epoch on the forced device
    path trains and joins its thread, also when a step raises."""
    from dermcam.train.config import TrainConfig
    from dermcam.train.schedule import epoch_order
    from dermcam.train.trainer import Trainer

    trainer = Trainer(TrainConfig(dataset="synth", backbone="test_efficientnet", pretrained="none", image_size="56x40",
                                  batch_size=8, precision="fp32", device="cpu", seed=SEED))
    trainer.build()
    trainer.epoch = EPOCH
    order = epoch_order(len(trainer.train_rows), trainer.train_labels, SEED, EPOCH, "loss", len(trainer.classes))
    x, y, _ = trainer.make_batch(order, 1)
    want_x, want_y = reference_batch(trainer.data.images, trainer.train_rows, trainer.train_labels, order, 1,
                                     epoch=EPOCH, augment=True, channels_last=True, shard=DistContext().shard,
                                     batch_size=8, preprocessing=trainer.preprocessing)
    assert x.shape == (8, 3, 40, 56) and torch.equal(x, want_x) and torch.equal(y, want_y)
    trainer.pipeline.on_device = True
    assert np.isfinite(trainer.train_one_epoch())
    assert not prefetch_threads()
    calls = iter(range(10**6))
    original = Trainer.forward_backward

    def fails_on_second_step(self, *args, **kwargs):
        if next(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "forward_backward", fails_on_second_step)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train_one_epoch()
    assert not prefetch_threads()


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-path", "device-path"])
def test_extras_travel_with_their_images_on_both_paths(cache, on_device) -> None:
    """Per-image extras (metadata, soft targets) are batched with the rows they belong to, sharded like them."""
    images, rows, labels, order = cache
    extras = {"soft": np.random.default_rng(1).random((len(rows), 3)).astype(np.float32),
              "meta": np.arange(len(rows) * 2, dtype=np.float32).reshape(-1, 2)}
    shard = DistContext(rank=1, world_size=3).shard
    pipe = BatchPipeline(images, rows, labels, batch_size=BATCH, preprocessing=PRE, augment=True, seed=SEED,
                         device=torch.device("cpu"), channels_last=True, shard=shard, on_device=on_device,
                         extras=extras)
    with pipe.epoch(order, EPOCH, 4) as batches:
        for b, (x, y, got) in enumerate(batches):
            picks = order[b * BATCH:(b + 1) * BATCH]
            mine = picks[shard(len(picks))]
            assert set(got) == {"soft", "meta"} and len(x) == len(y) == len(mine)
            for name, values in extras.items():
                assert torch.equal(got[name], torch.from_numpy(values[mine]))
    with pytest.raises(ValueError, match="extra 'meta' has 3 rows"):
        BatchPipeline(images, rows, labels, batch_size=BATCH, preprocessing=PRE, augment=False, seed=SEED,
                      device=torch.device("cpu"), channels_last=False, extras={"meta": np.zeros((3, 2))})
