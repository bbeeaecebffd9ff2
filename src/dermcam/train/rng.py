"""Random number generator state: seeding, and saving/restoring it for an exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def seed_rank(seed: int, epoch: int, rank: int) -> None:
    """Model randomness (dropout, drop-path) of one rank for one epoch: independent between ranks and,
    like everything else, a function of where training is (a resumed run draws the same masks)."""
    import torch

    torch.manual_seed((seed * 7919 + epoch) * 65_537 + rank + 1)


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()),
                             "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # a run may resume on a machine with fewer GPUs
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
