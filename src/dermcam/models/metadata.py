"""A timm backbone fused with patient metadata: image features and a small metadata network, one head.

:class:`MetadataFusion` holds the backbone built without a classifier (``num_classes=0``: it returns
its pooled features), a two-layer network on the encoded metadata (:mod:`dermcam.metadata_spec`:
``D -> hidden -> hidden``, ReLU and dropout), and a linear head on the two concatenated. Late fusion
keeps the backbone exactly a timm backbone: its pretrained weights load into ``backbone.*`` unchanged,
its stages freeze, Grad-CAM's target layer is found in it, and the image still dominates what is
learned while the metadata shifts the odds (age and site move the prior of melanoma; they cannot see
a lesion).

``forward(x, meta=None)``: ``meta`` is the (B, D) encoded metadata; None means "nothing known", the
spec's all-unknown row for every image, which is also what training sees for a row with no values.
So a metadata model answers an image without metadata, never refuses it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dermcam.metadata_spec import MetadataSpec


class MetadataFusion(torch.nn.Module):
    """Backbone features + metadata network -> one linear head (see the module docstring)."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int, spec: MetadataSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.metadata = torch.nn.Sequential(
            torch.nn.Linear(spec.dim, spec.hidden), torch.nn.ReLU(), torch.nn.Dropout(spec.dropout),
            torch.nn.Linear(spec.hidden, spec.hidden), torch.nn.ReLU(), torch.nn.Dropout(spec.dropout))
        # the width of what the backbone returns without a classifier (after any pre-logits layer)
        width = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.head = torch.nn.Linear(width + spec.hidden, num_classes)
        self.num_classes = num_classes
        self.num_features = width
        # Not saved with the weights: it follows from the sidecar's spec, which rebuilds it.
        self.register_buffer("unknown", torch.tensor(spec.unknown(), dtype=torch.float32), persistent=False)
        # timm's data config (input size, mean, std) and weight lookup read these from the model
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        self.default_cfg = self.pretrained_cfg

    @property
    def fields(self) -> tuple[str, ...]:
        return self.spec.fields

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        features = self.backbone(x)
        weight = self.metadata[0].weight
        if meta is None:
            meta = self.unknown.to(device=features.device).expand(features.shape[0], -1)
        meta = meta.to(device=weight.device, dtype=weight.dtype)
        if meta.shape[-1] != self.spec.dim:
            raise ValueError(f"metadata has {meta.shape[-1]} features, the model reads {self.spec.dim}")
        embedded = self.metadata(meta)
        return self.head(torch.cat([features, embedded.to(features.dtype)], dim=1))

    def get_classifier(self) -> torch.nn.Module:
        """The head (what a zero start and timm-style code look for)."""
        return self.head

    def head_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters training starts fresh and runs at ``--head-lr-scale``: the head and the metadata
        network (the backbone's are pretrained)."""
        yield from self.metadata.parameters()
        yield from self.head.parameters()


def fuse(backbone: torch.nn.Module, num_classes: int, metadata: Mapping[str, Any] | MetadataSpec) -> MetadataFusion:
    """A fusion model around ``backbone`` (built with ``num_classes=0``) for a recorded spec (a sidecar's
    ``metadata``; damaged: CorruptError) or a :class:`MetadataSpec`."""
    spec = metadata if isinstance(metadata, MetadataSpec) else MetadataSpec.from_dict(metadata)
    return MetadataFusion(backbone, num_classes, spec)


def image_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The timm network that sees the image: a fusion model's backbone, else the model itself."""
    return model.backbone if isinstance(model, MetadataFusion) else model


def uses_metadata(model: torch.nn.Module) -> bool:
    return isinstance(model, MetadataFusion)
