"""timm backbones: building a model for a class set, pretrained weights, freezing stages, its data config."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, CorruptError, first_line
from dermcam.models.timm_import import import_timm
from dermcam.progress import Progress

if TYPE_CHECKING:
    import torch


def check_backbone(backbone: str) -> None:
    """Refuse a name timm does not know, suggesting close ones: what training checks of every
    configuration before its first run, so a grid's typo does not surface after the other runs trained."""
    timm = import_timm()
    architecture = backbone.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for names"
        raise BadInputError(f"unknown backbone '{backbone}'{hint}")


def build_model(backbone: str, num_classes: int, metadata: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The timm network ``backbone`` with a ``num_classes`` head and random weights.

    Used directly when loading a dermcam checkpoint (its weights replace these) and by
    :func:`create_model`. An unknown name is a :class:`BadInputError` that suggests close names.
    ``metadata``: a recorded metadata spec (a sidecar's ``metadata`` block): the backbone without its
    classifier inside a :class:`~dermcam.models.metadata.MetadataFusion`, whose head reads the image
    features and the metadata.
    """
    timm = import_timm()
    if num_classes < 1:
        raise BadInputError(f"num_classes must be at least 1, got {num_classes}")
    check_backbone(backbone)
    try:
        if metadata is None:
            return timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        from dermcam.models.metadata import fuse

        return fuse(timm.create_model(backbone, pretrained=False, num_classes=0), num_classes, metadata)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag after the dot
        raise BadInputError(f"cannot build backbone '{backbone}': {first_line(exc)}") from None


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], backbone: str,
                source: str) -> torch.nn.Module:
    """``model`` with ``state`` loaded (names and shapes must match exactly), in eval mode.

    Weights that do not fit are a damaged or foreign file, never a partly loaded model: a
    :class:`CorruptError` naming ``source`` (a checkpoint or a file) and the first mismatch.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptError(f"{source} does not fit backbone {backbone}: {first_line(exc)}") from None
    return model.eval()


def build_with_weights(backbone: str, num_classes: int, state: Mapping[str, torch.Tensor],
                       source: str, metadata: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """:func:`build_model` (with ``metadata``, a fusion model) with trained weights loaded by
    :func:`load_strict` (eval mode)."""
    return load_strict(build_model(backbone, num_classes, metadata), state, backbone, source)


def create_model(backbone: str, num_classes: int, pretrained: str = "auto", *,
                 progress: Progress | None = None,
                 metadata: Mapping[str, Any] | None = None) -> tuple[torch.nn.Module, dict]:
    """timm model with a fresh ``num_classes`` head, initialised from pretrained weights.

    ``pretrained`` is ``auto`` (HF cache, then the hub if reachable, then an installed offline weight
    package), ``hub`` (HF cache or hub only), ``none`` (random init) or a path to a ``.safetensors`` /
    ``.pth`` state dict. Returns ``(model, provenance)`` with provenance
    ``{"source": "none" | "hf-cache" | "hub" | "package:<dist>" | "file:<abs path>",
    "dropped_keys": [...], "missing_keys": [...]}``: a pretrained classifier whose shape does not fit
    ``num_classes`` is dropped (listed in ``dropped_keys``) and left freshly initialised.
    With ``metadata`` (a metadata spec) the weights load into the fusion model's backbone, which has no
    classifier (so the pretrained one is always dropped and the fused head starts at zero).
    """
    from dermcam.models.metadata import image_backbone
    from dermcam.models.weights import apply_state_dict, resolve_pretrained  # not needed to load a checkpoint

    progress = progress or Progress()
    model = build_model(backbone, num_classes, metadata)
    if pretrained == "none":
        return model, {"source": "none", "dropped_keys": [], "missing_keys": []}
    state_dict, source = resolve_pretrained(backbone, pretrained, image_backbone(model))
    dropped, missing = apply_state_dict(image_backbone(model), state_dict, describe=source)
    if dropped:
        zero_classifier(model)
    progress.log(f"{backbone}: pretrained weights from {source}"
                 + (f" (new {num_classes}-class head)" if dropped else ""))
    return model, {"source": source, "dropped_keys": dropped, "missing_keys": missing}


def zero_classifier(model: torch.nn.Module) -> None:
    """Start a new head on pretrained features at zero: every class at equal odds, loss ln(K).

    timm initialises some heads for their original class count (EfficientNet's range is 1/sqrt(fan_out),
    so a 3-class head starts ~18x larger than the 1000-class one): its first logits are huge, the
    first epoch's loss starts near 6, and the large early gradients disturb the pretrained backbone.
    """
    import torch

    head = model.get_classifier()
    for param in head.parameters() if isinstance(head, torch.nn.Module) else []:
        torch.nn.init.zeros_(param)


def freeze_stages(model: torch.nn.Module, stages: int) -> None:
    """Freeze the stem and the first ``stages`` stages (no gradients, so no backward pass through them).

    The early stages compute generic edges and textures at the highest resolution, so their backward
    pass is the most expensive part of a CPU step (efficientnet_lite0 at 192x144 trains 1.9x faster
    with 2 stages frozen: benchmarks/bench_train.py) and fine-tuning them gains little on a few thousand images. Stages come from
    timm's own coarse parameter groups (stem, stage 1, ..., head), so this works for every family.
    Their BatchNorm statistics still adapt to dermoscopy images.
    """
    from timm.models._manipulate import group_with_matcher

    from dermcam.models.metadata import image_backbone

    if stages <= 0:
        return
    core = image_backbone(model)  # a metadata fusion model's stages are its backbone's
    # Names as the backbone's matcher knows them; the fusion's own parameters (metadata network, head)
    # get a prefix no matcher matches, so they fall into the last group, where a classifier would be.
    prefix = "" if core is model else "backbone."
    named = [(n[len(prefix):] if n.startswith(prefix) else "+" + n, p) for n, p in model.named_parameters()]
    try:
        groups = list(group_with_matcher(named, core.group_matcher(coarse=True), return_values=True).values())
    except (AttributeError, NotImplementedError):
        raise BadInputError(f"--freeze: {type(core).__name__} does not describe its stages; use --freeze 0") from None
    available = len(groups) - 2  # neither the stem (always frozen with stage 1) nor the head counts
    if stages > available:
        raise BadInputError(f"--freeze {stages}: {type(core).__name__} has only {available} stages "
                            "before its head")
    for group in groups[:stages + 1]:
        for param in group:
            param.requires_grad_(False)


def data_config(model_or_backbone: torch.nn.Module | str) -> dict:
    """The preprocessing a backbone's pretrained weights expect, from timm's ``pretrained_cfg``.

    ``{"input_size": [3, H, W], "mean": [...], "std": [...], "interpolation": "bicubic",
    "crop_pct": 0.875}``. Accepts a model (uses its own cfg) or a backbone name (no model is built).
    """
    timm = import_timm()
    from timm.data import resolve_data_config

    if isinstance(model_or_backbone, str):
        try:
            cfg = timm.models.get_pretrained_cfg(model_or_backbone, allow_unregistered=False)
        except RuntimeError:  # unknown architecture or pretrained tag
            cfg = None
        if cfg is None:
            raise BadInputError(f"unknown backbone '{model_or_backbone}' (no timm pretrained cfg)")
        resolved = resolve_data_config(pretrained_cfg=cfg.to_dict())
    else:
        from dermcam.models.metadata import image_backbone

        resolved = resolve_data_config({}, model=image_backbone(model_or_backbone))
    return {
        "input_size": [int(v) for v in resolved["input_size"]],
        "mean": [float(v) for v in resolved["mean"]],
        "std": [float(v) for v in resolved["std"]],
        "interpolation": str(resolved["interpolation"]),
        "crop_pct": float(resolved["crop_pct"]),
    }
