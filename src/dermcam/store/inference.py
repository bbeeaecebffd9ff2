"""Loading a model for prediction from a store checkpoint or a self-contained exported file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.store.checkpoint import Checkpoint
from dermcam.store.references import resolve

if TYPE_CHECKING:
    import torch


def model_from_checkpoint(ckpt: Checkpoint, verify: bool = True) -> torch.nn.Module:
    """Build the sidecar's backbone and load the checkpoint's weights (strict: shapes must match)."""
    from dermcam.models.backbones import build_with_weights

    return build_with_weights(ckpt.sidecar["backbone"], len(ckpt.sidecar["classes"]), ckpt.load_weights(verify=verify),
                              f"checkpoint {ckpt.id}")


def load_for_inference(ref: str | Path | None = None, root: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, sidecar) for a store checkpoint or a self-contained exported file.

    torch and timm are imported first, through :func:`dermcam.models.backbones.import_timm`: this is
    where evaluate and explain first need them, and that import is most of their start-up.
    """
    from dermcam.models.backbones import import_timm

    import_timm()
    if ref is not None and Path(str(ref)).is_file() and not Path(str(ref)).with_suffix(".json").is_file():
        from dermcam.store.exchange import load_exported

        return load_exported(Path(str(ref)))
    ckpt = resolve(ref, root)
    return model_from_checkpoint(ckpt), ckpt.sidecar
