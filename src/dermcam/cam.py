"""Class activation maps (Grad-CAM and friends) that never change the model they explain.

Every method here answers the same question, "which part of the image made the model say class
``c``?", with a map over the image in [0, 1]. They differ only in how they weight the channels of one
*target layer* (usually the last convolutional block):

=============  ====================================================================================
``gradcam``    Selvaraju et al. 2017: channel weight = spatial mean of d(logit_c)/d(activation).
``gradcam++``  Chattopadhay et al. 2018: gradient weights re-weighted per position (their eq. 19).
``scorecam``   Wang et al. 2020: gradient-free; channel weight = softmax over channels of the
               logit obtained when the input is masked by that (upsampled, min-max scaled) channel.
``eigencam``   Muhammad & Yeasin 2020: gradient-free and class-agnostic; projection of the
               activations on their first principal component.
=============  ====================================================================================

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


def _resolve_targets(target: Target, logits: torch.Tensor) -> list[int]:
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


def _model_device(model: torch.nn.Module) -> torch.device:
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


def _as_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
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

        device = _model_device(self.model)
        with preserved_model(self.model), _fp32_grad_context(device):
            inputs = _as_input(x, device)
            with self._captured() as store, torch.no_grad():
                logits = self.model(inputs)
            if not store:
                raise BadInputError(f"layer {self.layer_name!r} is not used in the model's forward pass")
            raw_act = store[-1]
            targets = _resolve_targets(target, logits)
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


class GradCAM(CAM):
    """Selvaraju et al. 2017 (https://arxiv.org/abs/1610.02391)."""

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        assert gradients is not None
        return gradients.mean(dim=(2, 3))


class GradCAMPlusPlus(CAM):
    """Chattopadhay et al. 2018 (https://arxiv.org/abs/1710.11063), closed form of their eq. 19.

    Positions where the gradient is positive get weight alpha = g^2 / (2 g^2 + sum(A) g^3), which
    lets several separate instances of a class all show up instead of the strongest one only.
    """

    name = "gradcam++"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        import torch

        assert gradients is not None
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp_min(0) * alpha).sum(dim=(2, 3))


class ScoreCAM(CAM):
    """Wang et al. 2020 (https://arxiv.org/abs/1910.01279): no gradients, one forward per channel.

    Each channel, upsampled to the input and min-max scaled, masks the input; the target logit of
    the masked image is that channel's score; weights are the softmax of the scores over channels.
    Masked images go through the model in batches of ``batch_size`` (memory vs speed).
    """

    name = "scorecam"
    uses_gradients = False

    def __init__(self, model: torch.nn.Module, target_layer: str,
                 reshape_transform: ReshapeTransform | None = None, batch_size: int = 32) -> None:
        super().__init__(model, target_layer, reshape_transform)
        self.batch_size = batch_size

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                targets: list[int]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        scores = []
        with torch.no_grad():
            # align_corners=True for the masks, as in the paper's reference code and pytorch-grad-cam
            masks = F.interpolate(activations, size=x.shape[-2:], mode="bilinear", align_corners=True)
            low = masks.flatten(2).min(dim=2).values[..., None, None]
            high = masks.flatten(2).max(dim=2).values[..., None, None]
            masks = (masks - low) / (high - low + 1e-8)
            for image, mask, target in zip(x, masks, targets):
                logits = [self.model(image[None] * chunk[:, None])[:, target]
                          for chunk in mask.split(self.batch_size)]
                scores.append(torch.cat(logits))
        return torch.stack(scores).float().softmax(dim=1)


class EigenCAM(CAM):
    """Muhammad & Yeasin 2020 (https://arxiv.org/abs/2008.00299): first principal component.

    Class-agnostic (the target only labels the result). The sign of a principal component is
    arbitrary, so it is chosen to make the larger excursion positive (Chung & Ying 2025, eq. 13);
    without this the map of the same image can come out inverted from one run to the next.
    """

    name = "eigencam"
    uses_gradients = False

    def saliency(self, activations: torch.Tensor, gradients: torch.Tensor | None, x: torch.Tensor,
                 targets: list[int]) -> torch.Tensor:
        import torch

        batch, channels, height, width = activations.shape
        rows = activations.nan_to_num(0.0).flatten(2).transpose(1, 2).double()  # (B, hw, C)
        rows = rows - rows.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(rows, full_matrices=False)
        projection = (rows @ vh[:, 0, :, None])[..., 0]  # (B, hw)
        flip = projection.min(dim=1).values.abs() > projection.max(dim=1).values.abs()
        projection = torch.where(flip[:, None], -projection, projection)
        return projection.reshape(batch, height, width).float()


METHODS: dict[str, type[CAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
}


def make_cam(model: torch.nn.Module, method: str, target_layer: str,
             reshape_transform: ReshapeTransform | None = None) -> CAM:
    """The CAM object for a method name (one of :data:`METHODS`), with a clear error otherwise."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise BadInputError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}") from None
    return cls(model, target_layer, reshape_transform)


def compute_cam(model: torch.nn.Module, x: torch.Tensor, method: str = "gradcam",
                target_layer: str | None = None, target: Target = None, tta: bool = False,
                reshape_transform: ReshapeTransform | None = None) -> CAMResult:
    """Maps for ``x`` (B, 3, H, W) with one of :data:`METHODS`.

    ``target_layer`` defaults to :func:`dermcam.models.find_target_layer`; ``reshape_transform`` to
    :func:`dermcam.models.reshape_transform_for` (token-to-map folding for ViT/Swin, None for CNNs),
    also when a layer is named, since a transformer's blocks all emit tokens.

    ``tta`` averages probabilities and maps over the four flips (none, horizontal, vertical, both;
    each map flipped back before averaging, then min-max scaled again): the explained class is the
    argmax of the averaged probabilities, so all four maps explain the same class. It costs four
    times the compute.
    """
    from dermcam.models import find_target_layer, reshape_transform_for

    if target_layer is None:
        target_layer = find_target_layer(model)
    if reshape_transform is None:
        reshape_transform = reshape_transform_for(model)
    cam = make_cam(model, method, target_layer, reshape_transform)
    if not tta:
        return cam(x, target)
    return _tta(cam, x, target)


# identity, horizontal, vertical, both: a closed set of flips, so the TTA map of a flipped image is
# exactly the flipped TTA map of the original (a lesion has no preferred orientation)
_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def predict(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities), each (B, K) float32, in fp32 eval mode without gradients; the model
    is left as found. ``tta`` averages over the four flips (probabilities averaged as probabilities)."""
    import torch

    device = _model_device(model)
    with preserved_model(model), torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        inputs = _as_input(x, device)
        flips = _FLIPS if tta else _FLIPS[:1]
        per_flip = torch.stack([model(inputs.flip(d) if d else inputs).float() for d in flips])
        logits, probs = per_flip.mean(0), per_flip.softmax(2).mean(0)
    return logits.cpu().numpy(), probs.cpu().numpy()


def _tta(cam: CAM, x: torch.Tensor, target: Target) -> CAMResult:
    """Flip-averaged CAM: predictions first (to fix the class), then one map per flip."""
    import torch

    logits, probs = predict(cam.model, x, tta=True)
    targets = _resolve_targets(target, torch.from_numpy(probs))
    maps = []
    for dims in _FLIPS:
        result = cam(x.flip(dims) if dims else x, targets)
        maps.append(np.flip(result.maps, axis=tuple(d - 1 for d in dims)) if dims else result.maps)
    mean = np.mean(maps, axis=0)
    low = mean.min(axis=(1, 2), keepdims=True)
    high = (mean - low).max(axis=(1, 2), keepdims=True)
    mean = ((mean - low) / (high + 1e-7)).astype(np.float32)
    return CAMResult(maps=np.ascontiguousarray(mean), logits=logits, probs=probs, targets=targets,
                     method=cam.name, layer=cam.layer_name)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """A strong blur (sigma ~ size/45, 5 px at 224) used as the 'nothing inserted yet' image."""
    import torch
    import torch.nn.functional as F

    sigma = max(1.0, max(x.shape[-2:]) / 45)
    radius = min(int(round(2 * sigma)), min(x.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def faithfulness(model: torch.nn.Module, x: torch.Tensor, cam_map: np.ndarray, target: Target = None,
                 steps: int = 20, batch_size: int = 32) -> dict[str, Any]:
    """Deletion and insertion AUC of maps (Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421).

    Pixels are ranked by the map. *Deletion* replaces the top-ranked fraction (0, 1/steps, ..., 1)
    with 0 (the data set's mean colour after normalisation) and records the target probability:
    a faithful map makes it fall fast, so **lower deletion AUC is better**. *Insertion* starts from
    a blurred copy and puts back the top-ranked pixels: **higher insertion AUC is better**. Each AUC
    is the trapezoidal area under probability vs fraction, in [0, 1]. Costs 2 x (steps + 1)
    forwards per image. ``x``: (B, 3, H, W); ``cam_map``: (B, H, W) at the same size; ``target``
    as for :class:`CAM` (default: predicted class). Returns per-image lists.
    """
    import torch

    maps = np.asarray(cam_map, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != x.shape[0] or maps.shape[1:] != tuple(x.shape[-2:]):
        raise BadInputError(f"cam_map must be shaped (B, H, W) = ({x.shape[0]}, {x.shape[2]}, {x.shape[3]}), "
                            f"got {maps.shape}")
    if steps < 1:
        raise BadInputError("steps must be at least 1")
    device = _model_device(model)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    result: dict[str, Any] = {"steps": steps, "deletion_auc": [], "insertion_auc": [],
                              "deletion_curve": [], "insertion_curve": []}
    with preserved_model(model), torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        inputs = _as_input(x, device)
        targets = _resolve_targets(target, model(inputs).float())
        blurred = _gaussian_blur(inputs)
        num_pixels = inputs.shape[-2] * inputs.shape[-1]
        counts = torch.as_tensor(np.round(fractions * num_pixels).astype(np.int64), device=device)
        for image, blur, saliency, cls in zip(inputs, blurred, maps, targets):
            order = torch.as_tensor(np.argsort(-saliency.ravel(), kind="stable"), device=device)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_pixels, device=device)
            # (steps+1, 1, H, W): True where the pixel is among the top-ranked fraction at that step
            chosen = (rank[None] < counts[:, None]).view(steps + 1, 1, *inputs.shape[-2:])
            for kind, start, end in (("deletion", image, torch.zeros_like(image)), ("insertion", blur, image)):
                probs = []
                for part in chosen.split(batch_size):
                    batch = torch.where(part, end[None], start[None])
                    probs.append(model(batch).float().softmax(1)[:, cls])
                curve = torch.cat(probs).cpu().numpy().astype(float)
                result[f"{kind}_curve"].append(curve.tolist())
                result[f"{kind}_auc"].append(float(((curve[:-1] + curve[1:]) / 2).sum() / steps))
    return result
