"""Loading a model for prediction from a store checkpoint or a self-contained exported file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import CorruptError
from dermcam.store.checkpoint import Checkpoint
from dermcam.store.references import resolve

if TYPE_CHECKING:
    import torch


def model_from_checkpoint(ckpt: Checkpoint, verify: bool = True) -> torch.nn.Module:
    """Build the sidecar's backbone and load the checkpoint's weights (strict: shapes must match)."""
    from dermcam.models.backbones import build_model

    model = build_model(ckpt.sidecar["backbone"], len(ckpt.sidecar["classes"]))
    state = ckpt.load_weights(verify=verify)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptError(f"checkpoint {ckpt.id} does not fit backbone {ckpt.sidecar['backbone']}: "
                           f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_for_inference(ref: str | Path | None = None, root: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, sidecar) for a store checkpoint or a self-contained exported file."""
    if ref is not None and Path(str(ref)).is_file() and not Path(str(ref)).with_suffix(".json").is_file():
        from dermcam.store.exchange import load_exported

        return load_exported(Path(str(ref)))
    ckpt = resolve(ref, root)
    return model_from_checkpoint(ckpt), ckpt.sidecar
