"""Multi-process training under torchrun: the process group, this process's rank, and a few collectives.

``torchrun --nproc-per-node N -m dermcam train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment. Training
stays defined by *where* it is (epoch order from ``(seed, epoch)``, augmentation from ``(seed, epoch,
batch)``, the LR from the step), so ranks never negotiate what to do: they only split the work.
Each takes a contiguous :meth:`DistContext.shard` of every global batch and of the validation split,
DistributedDataParallel averages the gradients, and the few values that must agree travel through
the collectives below (no pickle: strings go as uint8 tensors).

Nothing here imports torch at module level, so ``dermcam --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermcam.errors import BadInputError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; a single process is ``DistContext()`` (rank 0 of 1).

    The collective methods are no-ops returning their input when ``world_size`` is 1, so training
    code calls them unconditionally and a single process does exactly what it did before.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device every rank trains on (cuda:LOCAL_RANK or cpu); None: single process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and draws progress bars."""
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> slice:
        """Rank ``rank``'s (default: this one's) contiguous part of ``n`` items; sizes differ by at most one."""
        r = self.rank if rank is None else rank
        return slice(r * n // self.world_size, (r + 1) * n // self.world_size)

    def broadcast_str(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (what other ranks pass is ignored)."""
        if not self.enabled:
            return text
        import torch
        import torch.distributed as dist

        payload = torch.tensor(list(text.encode()), dtype=torch.uint8)
        length = torch.tensor([len(payload) if self.is_main else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src=0)
        buffer = payload.to(self.device) if self.is_main else torch.empty(int(length.item()), dtype=torch.uint8,
                                                                          device=self.device)
        dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank: decisions (early stopping) then agree bit for bit."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.cpu().tolist()]

    def all_gather_rows(self, local: np.ndarray, total: int) -> np.ndarray:
        """Concatenate every rank's ``shard(total)`` rows of a 2-D array, in rank order, on every rank."""
        if not self.enabled:
            return local
        import torch
        import torch.distributed as dist

        sizes = [self.shard(total, r).stop - self.shard(total, r).start for r in range(self.world_size)]
        if len(local) != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {len(local)} rows, its shard of {total} is {sizes[self.rank]}")
        mine = torch.as_tensor(np.ascontiguousarray(local))
        buffer = torch.zeros((max(sizes), *mine.shape[1:]), dtype=mine.dtype, device=self.device)
        buffer[:len(mine)] = mine.to(self.device)
        parts = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(parts, buffer)
        return np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes)])


_active: DistContext | None = None


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``); 1 when not launched by torchrun."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        raise BadInputError(f"WORLD_SIZE={raw!r} in the environment is not a number") from None
    if size < 1:
        raise BadInputError(f"WORLD_SIZE={size} in the environment must be at least 1")
    return size


def current() -> DistContext:
    """The context of the open :func:`session`, or a single process outside one."""
    return _active or DistContext()


def launch_device(requested: str, local_rank: int) -> Any:
    """The device of process ``local_rank`` on its machine: ``cuda:LOCAL_RANK`` (one GPU per process) or cpu."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "cuda":
        raise BadInputError(f"--device {requested} cannot be used with torchrun: each process takes "
                            "cuda:LOCAL_RANK with --device cuda (or auto), or use --device cpu")
    if not torch.cuda.is_available():
        raise BadInputError("--device cuda requested but CUDA is not available; use --device cpu with torchrun")
    if local_rank >= torch.cuda.device_count():
        raise BadInputError(f"process with LOCAL_RANK {local_rank} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; lower --nproc-per-node")
    return torch.device("cuda", local_rank)


def _init(requested_device: str) -> DistContext:
    """Join the process group torchrun set up: NCCL with one GPU per process, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise BadInputError("WORLD_SIZE > 1 but RANK / LOCAL_RANK are missing: start multi-process "
                            "training with torchrun") from None
    device = launch_device(requested_device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if rank != 0:
        # Results, tables and --json output are rank 0's to print; the others would repeat them.
        # Only stdout goes: errors on stderr still name the rank that failed.
        sys.stdout = open(os.devnull, "w")  # open for the rest of the process
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistContext]:
    """Open the process group when torchrun launched this process, and always close it again.

    Re-entrant: a session inside a session (``train`` inside ``train_many``) reuses the outer one, so
    the group is initialised once per process. Outside torchrun it yields a single-process context.
    ``device`` is the command's ``--device``: under torchrun it applies to every run of the launch.
    """
    global _active
    if _active is not None:
        yield _active
        return
    if launched_world_size() == 1:
        yield DistContext()
        return
    import torch.distributed as dist

    ctx = _init(device)
    _active = ctx
    try:
        yield ctx
    finally:
        _active = None
        dist.destroy_process_group()
