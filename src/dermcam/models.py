"""Backbones: build timm models with a fresh head, find the layer Grad-CAM should look at, pick a device.

Everything users choose with ``--backbone`` is a timm model name (optionally with a pretrained tag,
``convnext_tiny.fb_in22k``). :func:`create_model` adds pretrained weights from wherever they can be found
offline (see :mod:`dermcam.weights`); :func:`build_model` makes the same network with random weights, for
loading a dermcam checkpoint into.

torch and timm are imported inside functions so that ``dermcam --help`` stays instant.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, NotFoundError
from dermcam.progress import Progress
from dermcam.weights import (apply_state_dict, list_offline_weight_packages, load_state_dict_file,
                             resolve_pretrained)

if TYPE_CHECKING:
    import torch

__all__ = [
    "build_model", "cpu_supports_bf16", "create_model", "data_config", "find_target_layer", "get_submodule",
    "list_offline_weight_packages", "load_state_dict_file", "reshape_transform_for", "select_device",
]


# --------------------------------------------------------------------------------------------- building


def build_model(backbone: str, num_classes: int) -> torch.nn.Module:
    """The timm network ``backbone`` with a ``num_classes`` head and random weights.

    Used directly when loading a dermcam checkpoint (its weights replace these) and by
    :func:`create_model`. An unknown name is a :class:`BadInputError` that suggests close names.
    """
    import timm

    if num_classes < 1:
        raise BadInputError(f"num_classes must be at least 1, got {num_classes}")
    architecture = backbone.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for names"
        raise BadInputError(f"unknown backbone '{backbone}'{hint}")
    try:
        return timm.create_model(backbone, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag after the dot
        raise BadInputError(f"cannot build backbone '{backbone}': {str(exc).splitlines()[0]}") from None


def create_model(backbone: str, num_classes: int, pretrained: str = "auto", *,
                 progress: Progress | None = None) -> tuple[torch.nn.Module, dict]:
    """timm model with a fresh ``num_classes`` head, initialised from pretrained weights.

    ``pretrained`` is ``auto`` (HF cache, then the hub if reachable, then an installed offline weight
    package), ``hub`` (HF cache or hub only), ``none`` (random init) or a path to a ``.safetensors`` /
    ``.pth`` state dict. Returns ``(model, provenance)`` with provenance
    ``{"source": "none" | "hf-cache" | "hub" | "package:<dist>" | "file:<abs path>",
    "dropped_keys": [...], "missing_keys": [...]}``: a pretrained classifier whose shape does not fit
    ``num_classes`` is dropped (listed in ``dropped_keys``) and left freshly initialised.
    """
    progress = progress or Progress()
    model = build_model(backbone, num_classes)
    if pretrained == "none":
        return model, {"source": "none", "dropped_keys": [], "missing_keys": []}
    state_dict, source = resolve_pretrained(backbone, pretrained, model)
    dropped, missing = apply_state_dict(model, state_dict, describe=source)
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
    from timm.models import group_parameters

    if stages <= 0:
        return
    try:
        groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    except (AttributeError, NotImplementedError):
        raise BadInputError(f"--freeze: {type(model).__name__} does not describe its stages; use --freeze 0") from None
    available = len(groups) - 2  # neither the stem (always frozen with stage 1) nor the head counts
    if stages > available:
        raise BadInputError(f"--freeze {stages}: {type(model).__name__} has only {available} stages "
                            "before its head")
    params = dict(model.named_parameters())
    for group in groups[:stages + 1]:
        for name in group:
            params[name].requires_grad_(False)


def data_config(model_or_backbone: torch.nn.Module | str) -> dict:
    """The preprocessing a backbone's pretrained weights expect, from timm's ``pretrained_cfg``.

    ``{"input_size": [3, H, W], "mean": [...], "std": [...], "interpolation": "bicubic",
    "crop_pct": 0.875}``. Accepts a model (uses its own cfg) or a backbone name (no model is built).
    """
    import timm
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
        resolved = resolve_data_config({}, model=model_or_backbone)
    return {
        "input_size": [int(v) for v in resolved["input_size"]],
        "mean": [float(v) for v in resolved["mean"]],
        "std": [float(v) for v in resolved["std"]],
        "interpolation": str(resolved["interpolation"]),
        "crop_pct": float(resolved["crop_pct"]),
    }


# ------------------------------------------------------------------------------------------ CAM layers

# (module, class, rule): the layer whose output Grad-CAM weighs, per timm family. CNNs: the last
# spatial feature map before global pooling. EfficientNet/MobileNetV2: ``bn2`` is ``conv_head``'s
# output after its BatchNorm + activation, i.e. exactly the map that gets pooled. MobileNetV3 pools
# *before* conv_head, so its last spatial map is the last block. Swin: the last block's norm1 (NHWC).
# Token ViTs (ViT, DeiT, ViT-RelPos, ...) are recognised by shape rather than class, see _is_token_vit.
_FAMILY_RULES: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("timm.models.swin_transformer", "SwinTransformer",
     lambda m: f"layers.{len(m.layers) - 1}.blocks.{len(m.layers[-1].blocks) - 1}.norm1"),
    ("timm.models.convnext", "ConvNeXt", lambda m: f"stages.{len(m.stages) - 1}"),
    ("timm.models.efficientnet", "EfficientNet", lambda m: "bn2"),
    ("timm.models.mobilenetv3", "MobileNetV3", lambda m: f"blocks.{len(m.blocks) - 1}"),
    ("timm.models.resnet", "ResNet", lambda m: "layer4"),
    ("timm.models.regnet", "RegNet", lambda m: "s4"),
)


def _family_class(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # an older/newer timm without that family
        return None


def find_target_layer(model: torch.nn.Module) -> str:
    """Dotted name of the module whose activations Grad-CAM should use for ``model``.

    Known timm families use a fixed rule; anything else falls back to a dry forward pass that picks
    the last module producing a spatial (B, C, H, W) map with H, W > 1. Raises :class:`NotFoundError`
    when no such module exists (e.g. a model that flattens early).
    """
    if _is_token_vit(model):
        return f"blocks.{len(model.blocks) - 1}.norm1"
    for module_name, class_name, rule in _FAMILY_RULES:
        cls = _family_class(module_name, class_name)
        if cls is not None and isinstance(model, cls):
            return rule(model)
    return _last_spatial_module(model)


def _is_token_vit(model: torch.nn.Module) -> bool:
    """ViT-style: a patch grid, prefix tokens and pre-norm blocks, whatever timm class implements it.

    Their blocks emit (B, tokens, C); the last block's norm1 is the standard Grad-CAM target.
    """
    blocks = getattr(model, "blocks", None)
    return (hasattr(getattr(model, "patch_embed", None), "grid_size") and hasattr(model, "num_prefix_tokens")
            and blocks is not None and len(blocks) > 0 and hasattr(blocks[-1], "norm1"))


def _probe_input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """Small input for the dry forward: 128 px unless the model only accepts its own size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    if cfg.get("fixed_input_size"):
        return channels, height, width
    return channels, 128, 128


def _last_spatial_module(model: torch.nn.Module) -> str:
    """Generic fallback: hook every module, run one tiny batch, keep the last 4-D spatial output.

    Several modules usually hand back that same final tensor (a block, its stage, the stage list, an
    ``nn.Identity`` placeholder, an in-place activation). Among them, prefer the stage timm itself
    declares as the last feature map (``feature_info``), else the outermost module that computed
    something (forward hooks fire child-first, so it fires last). Modules called more than once (shared
    activations) are never chosen: a CAM hook on them would see several maps.
    """
    import torch

    calls: dict[str, int] = {}
    final: dict[str, Any] = {"tensor": None, "group": []}  # the last spatial tensor and who returned it

    def hook_for(name: str) -> Callable:
        def hook(_module: torch.nn.Module, inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if not (isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) > 1):
                return
            passthrough = bool(inputs) and output is inputs[0]
            if output is not final["tensor"]:
                final["tensor"], final["group"] = output, []
            final["group"].append((name, passthrough))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        probe = torch.zeros(1, *_probe_input_size(model), device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            model(probe)
    except Exception as exc:  # any model-specific failure means: we cannot find it this way
        raise NotFoundError(f"cannot find a Grad-CAM layer for {type(model).__name__}: a probe forward "
                            f"pass failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            "name one explicitly") from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    group = [(name, passthrough) for name, passthrough in final["group"] if calls[name] == 1]
    if not group:
        raise NotFoundError(f"{type(model).__name__} has no layer producing a spatial (B, C, H, W) feature "
                            "map; Grad-CAM needs one, name a layer explicitly")
    feature_info = getattr(model, "feature_info", None)
    last_info = feature_info[-1] if isinstance(feature_info, list) and feature_info else {}
    channels = last_info.get("num_chs")
    shape = final["tensor"].shape
    if channels is not None and shape[-1] == channels != shape[1]:
        raise NotFoundError(f"{type(model).__name__} keeps channels-last (B, H, W, C) feature maps, which the "
                            "generic Grad-CAM layer search does not support; name a layer and reshape explicitly")
    declared = last_info.get("module")
    names = [name for name, _ in group]
    if declared in names:
        return declared
    computing = [name for name, passthrough in group if not passthrough]
    return (computing or names)[-1]


def get_submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model.get_submodule(name)``, but a wrong name is a one-line error that lists likely names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        if not close:
            close = [n for n, _ in model.named_children()]
        raise BadInputError(f"{type(model).__name__} has no layer '{name}'; candidates: "
                            f"{', '.join(close)}") from None


def reshape_transform_for(model: torch.nn.Module) -> Callable | None:
    """A function turning the target layer's output into (B, C, H, W), or None for CNNs.

    ViT / DeiT blocks emit tokens (B, prefix + H*W, C): drop the class / distillation / register tokens
    and fold the rest onto the patch grid. Swin blocks in timm emit NHWC maps: permute them.
    """
    swin = _family_class("timm.models.swin_transformer", "SwinTransformer")
    if _is_token_vit(model):
        return _TokensToMap(int(getattr(model, "num_prefix_tokens", 1)),
                            tuple(model.patch_embed.grid_size))
    if swin is not None and isinstance(model, swin):
        return _nhwc_to_nchw
    return None


class _TokensToMap:
    """ViT tokens -> (B, C, H, W); a class (not a closure) so it pickles for multiprocessing."""

    def __init__(self, prefix_tokens: int, grid: tuple[int, int]) -> None:
        self.prefix_tokens = prefix_tokens
        self.grid = grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens:, :]
        count = patches.shape[1]
        height, width = self.grid
        if height * width != count:  # dynamic image size: assume a square grid
            height = width = int(round(count ** 0.5))
            if height * width != count:
                raise BadInputError(f"cannot fold {count} ViT tokens into a square grid")
        return patches.reshape(patches.shape[0], height, width, patches.shape[2]).permute(0, 3, 1, 2)


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- devices

_CPUINFO = Path("/proc/cpuinfo")


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast can pay off.

    Without those instructions PyTorch emulates bf16 and autocast is slower than fp32 (see
    docs/models.md for measurements). Reads /proc/cpuinfo on Linux, else asks torch's CPU probes.
    """
    if _CPUINFO.exists():
        flags: set[str] = set()
        for line in _CPUINFO.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def select_device(requested: str = "auto") -> torch.device:
    """The torch device to train / infer on: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. Asking for an accelerator that is not there is a :class:`BadInputError`."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise BadInputError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device '{requested}' requested but CUDA is not available "
                                f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"device '{requested}' requested but only {torch.cuda.device_count()} "
                                "CUDA device(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadInputError("device 'mps' requested but Apple MPS is not available; use cpu or auto")
    elif device.type != "cpu":
        raise BadInputError(f"unsupported device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return device

