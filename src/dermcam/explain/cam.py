"""Class activation maps: the machinery every method shares, without ever changing the model it explains.

Every method answers the same question, "which part of the image made the model say class ``c``?",
with a map over the image in [0, 1]. They differ only in how they weight the channels of one *target
layer*, so :class:`CAM` does everything else (hooks, fp32, the model left as found, upsampling,
scaling) and each method in :mod:`dermcam.explain.methods` overrides a few lines.

How a map is made (the same conventions as ``pytorch-grad-cam``, so the two agree to ~1e-6): the
weighted sum of activations goes through a ReLU (only evidence *for* the class), is upsampled
bilinearly to the input size (``align_corners=False``, i.e. pixel centres, as OpenCV does), then is
min-max scaled to [0, 1] per image. An all-zero map means "no positive evidence at this layer".

Why our own code rather than ``pytorch-grad-cam`` at run time: it leaves the model in eval mode,
back-propagates through the whole network into every parameter's ``.grad``, needs OpenCV and
matplotlib, and raises when the backbone is frozen (nothing before the layer requires grad).

Here the model is left exactly as found (train/eval flag of every module, ``requires_grad`` and
``.grad`` of every parameter, the state dict); autograd records only the layers after the target layer
and :func:`torch.autograd.grad` differentiates with respect to its output alone (so frozen backbones
work, and neither the forward nor the backward pays for the rest of the backbone: see
benchmarks/bench_explain.py); hooks are removed even when something raises; and everything runs in
fp32 with autocast disabled, even inside a caller's bf16 autocast block.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError

if TYPE_CHECKING:
    import torch


ReshapeTransform = Callable[["torch.Tensor"], "torch.Tensor"]


Target = int | Sequence[int] | None


@dataclass
class CAMResult:
    """Maps and predictions for a batch.

    ``maps``: (B, H, W) float32 in [0, 1] at the input's size; ``logits``/``probs``: (B, K) float32;
    ``targets``: the class each map explains (the prediction unless a target was asked for).
    """

    maps: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    targets: list[int]
    method: str
    layer: str


def resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name`` (dotted path as in ``named_modules``), or a one-line error with
    the closest existing names, so a typo in ``--layer`` is fixed in one go."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
            f"; top-level layers are: {', '.join(n for n, _ in model.named_children())}")
        raise BadInputError(f"layer {name!r} not found in {type(model).__name__}{hint}") from None


def resolve_targets(target: Target, logits: torch.Tensor) -> list[int]:
    """One class index per image: the argmax, one class for all, or one class each."""
    batch, num_classes = logits.shape
    if target is None:
        return [int(i) for i in logits.argmax(dim=1).tolist()]
    targets = [int(target)] * batch if isinstance(target, (int, np.integer)) else [int(t) for t in target]
    if len(targets) != batch:
        raise BadInputError(f"got {len(targets)} target classes for a batch of {batch} images")
    bad = [t for t in targets if not 0 <= t < num_classes]
    if bad:
        raise BadInputError(f"target class {bad[0]} is out of range: the model has {num_classes} classes")
    return targets


def model_device(model: torch.nn.Module) -> torch.device:
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module) -> Iterator[None]:
    """Run the model in eval mode, then put back every module's train/eval flag and every
    parameter's ``requires_grad``, whatever happens inside (BatchNorm in train mode would otherwise
    update its running statistics, and dropout would make maps random)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def _fp32_grad_context(device: torch.device) -> contextlib.ExitStack:
    """fp32 with gradients on, even inside a caller's ``no_grad``/``inference_mode``/bf16 autocast."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
    return stack


def as_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh fp32 leaf copy of the batch on the model's device (never the caller's tensor)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise BadInputError(f"expected a batch of RGB images shaped (B, 3, H, W), got {tuple(x.shape)}")
    import torch

    return x.detach().to(device=device, dtype=torch.float32).clone()


def minmax_maps(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """ReLU, bilinear upsampling to ``size`` (pixel centres), per-image min-max to [0, 1]."""
    import torch
    import torch.nn.functional as F

    cam = F.interpolate(raw.clamp_min(0)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    cam = cam - low
    high = cam.flatten(1).max(dim=1).values[:, None, None]
    # a relative scale (no additive epsilon): the map's peak is exactly 1 whatever the logit scale
    return (cam / high.clamp_min(torch.finfo(cam.dtype).tiny)).detach().cpu().numpy().astype(np.float32)


class CAM:
    """Base class: hooks the target layer, runs the model, hands activations (and gradients) to
    :meth:`weights`. A new method is a subclass that overrides :meth:`weights` (channel weights) or,
    for methods that are not a weighted sum of channels, :meth:`saliency`.

    ``target_layer`` is a dotted module name (``"blocks.5"``, ``"stages.3"``). ``reshape_transform``
    turns a token layer's output (B, N, C) into a feature map (B, C, h, w) for vision transformers.
    """

    name = "cam"
    uses_gradients = True

    def __init__(self, model: torch.nn.Module, target_layer: str,
                 reshape_transform: ReshapeTransform | None = None) -> None:
        self.model = model
        self.layer_name = target_layer
        self.layer = resolve_layer(model, target_layer)
        self.reshape_transform = reshape_transform

    @contextlib.contextmanager
    def _captured(self) -> Iterator[list[torch.Tensor]]:
        """Record the target layer's output during a forward run under ``no_grad``; the hook is
        removed on every exit path.

        For gradient methods the hook turns gradients on and makes the output a fresh leaf: autograd
        then records only the layers *after* the target (the backbone before it runs as plain
        inference, about 1.6x faster and without its saved activations), ``d score / d output`` is
        exactly the gradient Grad-CAM needs, and frozen parameters do not matter. The hook returns a
        clone so that an in-place op after the layer (``ReLU(inplace=True)``) cannot overwrite the
        activation we keep; gradients flow through the clone unchanged.
        """
        import torch

        store: list[torch.Tensor] = []

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise BadInputError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor; "
                    "pick a layer whose output is a feature map")
            if self.uses_gradients:
                torch.set_grad_enabled(True)  # undone when the caller's no_grad block exits
                output = output.detach().requires_grad_(True)
            store.append(output)
            return output.clone()

        handle = self.layer.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def _feature_map(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) from the raw layer output, via the reshape transform for token layers."""
        out = self.reshape_transform(tensor) if self.reshape_transform is not None else tensor
        if out.ndim != 4:
            raise BadInputError(
                f"layer {self.layer_name!r} gives a {tuple(out.shape)} output, not a (B, C, h, w) feature "
                "map; choose a convolutional layer or pass a reshape transform for transformer tokens")
        return out

    def __call__(self, x: torch.Tensor, target: Target = None) -> CAMResult:
        """Maps for a batch ``x`` (B, 3, H, W) explaining ``target`` (default: each predicted class)."""
        import torch

        device = model_device(self.model)
        with preserved_model(self.model), _fp32_grad_context(device):
            inputs = as_input(x, device)
            with self._captured() as store, torch.no_grad():
                logits = self.model(inputs)
            if not store:
                raise BadInputError(f"layer {self.layer_name!r} is not used in the model's forward pass")
            raw_act = store[-1]
            targets = resolve_targets(target, logits)
            gradients = None
            if self.uses_gradients:
                score = logits[torch.arange(len(targets), device=logits.device), targets].sum()
                (grad,) = torch.autograd.grad(score, raw_act)
                gradients = self._feature_map(grad).float()
            activations = self._feature_map(raw_act.detach()).float()
            raw = self.saliency(activations, gradients, inputs.detach(), targets)
            maps = minmax_maps(raw.detach(), tuple(inputs.shape[-2:]))
        logits = logits.detach().float()
        return CAMResult(maps=maps, logits=logits.cpu().numpy(), probs=logits.softmax(1).cpu().numpy(),
                         targets=targets, method=self.name, layer=self.layer_name)

    def saliency(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                 targets: list[int]) -> torch.Tensor:
        """Raw (B, h, w) map before ReLU and scaling: the channel-weighted sum of activations."""
        import torch

        weights = self.weights(activations, gradients, x, targets)
        return torch.einsum("bc,bchw->bhw", weights, activations)

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        """(B, C) channel weights: the one thing most methods define."""
        raise NotImplementedError(f"{type(self).__name__} must define weights() or saliency()")
