"""Several trained models answering as one: the mean of their calibrated probabilities.

An :class:`EnsembleModel` takes the image *as the cache holds it* (float in [0, 1] at the members'
shared cache size) and gives every member exactly the input it would get on its own: its own colour
constancy (:mod:`dermcam.color`), resized to its own input size and normalised with its own mean and
std (:func:`dermcam.data.geometry.batch_input` does the same three steps). Each member's softmax is
calibrated with the member's own calibration, then the probabilities are averaged with the ensemble's
weights.

It returns ``log p`` of the averaged probabilities, so that everything built for one model (softmax,
TTA averaging, faithfulness scores, ONNX export) gets ``p`` back from ``softmax(log p)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dermcam.color import apply_color_constancy, color_constancy_of
from dermcam.models.metadata import uses_metadata

LOG_FLOOR = 1e-30  # log(0) guard, as in dermcam.evaluate.calibration
# An ensemble's patient metadata: one encoded (B, D_i) tensor per member (None: nothing known, or a
# member that reads none); members trained on other sets encode with their own vocabularies.
MemberMetadata = Sequence["torch.Tensor | None"] | None

def calibration_terms(calibration: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) such that calibrated = softmax(scale * log p + bias): one per class for vector
    scaling, 1/T and 0 (broadcast over the classes) for a temperature, (1, 0) without a calibration.
    The torch twin of :func:`dermcam.evaluate.calibration.rescale`."""
    if not calibration:
        return torch.ones(1), torch.zeros(1)
    if calibration.get("method") == "vector":
        return (torch.tensor(calibration["scale"], dtype=torch.float32),
                torch.tensor(calibration["bias"], dtype=torch.float32))
    return torch.tensor([1.0 / float(calibration["temperature"])]), torch.zeros(1)


@dataclass(frozen=True)
class MemberSpec:
    """What the ensemble needs to know about one member besides its weights."""

    preprocessing: Mapping[str, Any]
    calibration: Mapping[str, Any] | None
    weight: float


class Member(torch.nn.Module):
    """One member: its own colour constancy, resize and normalisation in front, its own calibration behind."""

    def __init__(self, model: torch.nn.Module, spec: MemberSpec, calibrated: bool) -> None:
        super().__init__()
        self.model = model
        self.uses_metadata = uses_metadata(model)  # members may differ: each reads its own encoding
        _, height, width = (int(v) for v in spec.preprocessing["input_size"])
        self.size = (height, width)
        self.color_method = color_constancy_of(spec.preprocessing)  # "none" for sidecars without it
        self.register_buffer("mean", torch.tensor(spec.preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.calibrated = bool(calibrated and spec.calibration)
        scale, bias = calibration_terms(spec.calibration if self.calibrated else None)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The cache image (N, 3, H, W) in [0, 1] -> this member's normalised input, as batch_input makes it."""
        import torch.nn.functional as F

        x = self.color_constancy(x)
        # dermcam.data.geometry.resize, written out: models may not import data (data imports the store,
        # which imports models; tests/test_architecture.py). tests/test_ensemble.py checks they agree.
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return self.normalise(x)

    def color_constancy(self, x: torch.Tensor) -> torch.Tensor:
        """The cache image in [0, 1] with this member's colour constancy (dermcam.color, the formula
        geometry.batch_input applies too), at the cache size; separate for the ONNX export's resize."""
        return apply_color_constancy(x, self.color_method)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """An image already at this member's input size, in [0, 1] -> normalised with its mean and std
        (separate so that the ONNX export can resize with its own matrices and normalise the same way)."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def probabilities(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.input_probabilities(self.model_input(x), meta)

    def input_probabilities(self, z: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """This member's (calibrated) probabilities for its own normalised input ``z``."""
        return self.calibrate(self.raw_probabilities(z, meta))

    def raw_probabilities(self, z: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Its network's softmax for its own normalised input ``z``, before any calibration. ``meta``: its
        own encoded patient metadata when it is a metadata model (None: nothing known); others ignore it."""
        out = self.model(z, meta) if self.uses_metadata else self.model(z)
        return out.float().softmax(1)

    def calibrate(self, probs: torch.Tensor) -> torch.Tensor:
        """Its raw probabilities -> what it reports (calibrated, or as they are without a calibration)."""
        if self.calibrated:
            probs = (probs.clamp_min(LOG_FLOOR).log() * self.scale + self.bias).softmax(1)
        return probs


class EnsembleModel(torch.nn.Module):
    """Members (each a :class:`Member`) combined by the weighted mean of their (calibrated) probabilities.

    ``forward`` returns log-probabilities (see the module docstring); :meth:`member_inputs` gives each
    member's own input, which explain uses to compute each member's map at its own target layer.
    """

    def __init__(self, models: Sequence[torch.nn.Module], specs: Sequence[MemberSpec], *,
                 calibrated: bool = True) -> None:
        super().__init__()
        if len(models) != len(specs) or not models:
            raise ValueError("an ensemble needs one spec per member and at least one member")
        self.members = torch.nn.ModuleList(Member(m, spec, calibrated) for m, spec in zip(models, specs))
        weights = torch.tensor([float(spec.weight) for spec in specs], dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum())

    def forward(self, x: torch.Tensor, meta: MemberMetadata = None) -> torch.Tensor:
        """``meta``: one entry per member, its own encoded metadata (None for a member without metadata,
        or for one whose image comes without); None for all: nothing known."""
        return self._log_mean(member.probabilities(x, m) for member, m in zip(self.members, self.each(meta)))

    def each(self, meta: MemberMetadata) -> list[torch.Tensor | None]:
        """``meta`` as one entry per member (None everywhere when None)."""
        if meta is None:
            return [None] * len(self.members)
        if len(meta) != len(self.members):
            raise ValueError(f"metadata for {len(meta)} members given to an ensemble of {len(self.members)}")
        return list(meta)

    def combine(self, inputs: Sequence[torch.Tensor], meta: MemberMetadata = None) -> torch.Tensor:
        """``forward`` from each member's own normalised input (:meth:`Member.normalise` of the cache
        image resized to its input size): the ONNX export resizes with fixed matrices, then calls this."""
        return self._log_mean(member.input_probabilities(z, m)
                              for member, z, m in zip(self.members, inputs, self.each(meta)))

    def _log_mean(self, probs: Iterable[torch.Tensor]) -> torch.Tensor:
        total = sum(w * p for w, p in zip(self.weights, probs))
        assert isinstance(total, torch.Tensor)
        return total.clamp_min(LOG_FLOOR).log()

    def member_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [member.model_input(x) for member in self.members]


class WithRaw(torch.nn.Module):
    """An ensemble's reported and raw log-probabilities side by side, ``(N, 2K)``, from one pass of its
    members: evaluate compares the two (ECE, Brier, NLL) the way it does for a checkpoint, whose raw
    softmax it has anyway. ``dermcam.evaluate.predict.predict(..., heads=2)`` softmaxes each half."""

    def __init__(self, ensemble: EnsembleModel) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor, meta: MemberMetadata = None) -> torch.Tensor:
        raw = [member.raw_probabilities(member.model_input(x), m)
               for member, m in zip(self.ensemble.members, self.ensemble.each(meta))]
        reported = [member.calibrate(p) for member, p in zip(self.ensemble.members, raw)]
        return torch.cat([self.ensemble._log_mean(reported), self.ensemble._log_mean(raw)], dim=1)
