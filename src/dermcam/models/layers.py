"""Which layer of a backbone Grad-CAM explains, and how a transformer's tokens fold back into a map."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, NotFoundError, first_line

if TYPE_CHECKING:
    import torch


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
    when no such module exists (e.g. a model that flattens early). A metadata fusion model's layer is
    its backbone's (``backbone.<layer>``): the metadata has no spatial map to explain.
    """
    from dermcam.models.metadata import image_backbone

    core = image_backbone(model)
    if core is not model:
        return "backbone." + find_target_layer(core)
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
                            f"pass failed ({first_line(exc)}); "
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
    and fold the rest onto the patch grid. Swin blocks in timm emit NHWC maps: permute them. A metadata
    fusion model's layers are its backbone's, so its backbone decides.
    """
    from dermcam.models.metadata import image_backbone

    model = image_backbone(model)
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
