"""Part 1 of the audit: where each image's CAM puts its mass, and whether that predicts mistakes.

For every audited image the Grad-CAM of the class the model *decided* (the operating point's decision
when there is one: the map explains what the model answered, as ``dermcam explain`` does) is computed
by the explain machinery (:func:`dermcam.explain.ensemble.maps_for`: one model's map, or an ensemble's
mean map), upsampled to the cache image and split over the regions of
:func:`dermcam.audit.detectors.region_masks`: the outer border band, the dark vignette of the
dermoscope's field, ink-like marker pixels and everything outside the unsupervised lesion mask. A share
is the fraction of the map's total mass inside a region (:func:`dermcam.audit.detectors.mass_shares`).

The rules, chosen to be read without a manual:

- A region *holds most of the attention* in an image when its share exceeds :data:`MOST` (one half).
- An image is *off the lesion* when its off-lesion share exceeds :data:`OFF_LESION` (one half) and its
  lesion mask is usable (``LesionMask.ok``: the mask rule is known to fail on images without contrast,
  or where the "lesion" fills the frame; those images are counted, never judged).
- A region is *flagged* when it holds most of the attention in at least :data:`FLAG_SHARE` (a fifth)
  of the images where it exists (its area is at least :data:`MIN_AREA` of the image; for off-lesion:
  images with a usable lesion mask). A model that reads the lesion keeps most of its mass on it; one
  fifth of the images is far above what chance framing gives, and low enough to catch a shortcut
  that only some images offer (ink is on a minority of photos).
- An all-zero map ("no positive evidence at the layer") has no shares: it is counted and left out.

Whether off-lesion images are more often wrong: the error rate of the decisions on off-lesion images
against the rest (both with a usable mask), each with a Wilson 95% interval, and their difference with
Newcombe's interval built from them (method 10, Newcombe 1998): "more often wrong" only when that
interval lies above zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import BadInputError, DermcamError
from dermcam.progress import Progress

if TYPE_CHECKING:
    import torch

METHOD = "gradcam"
MOST = 0.5
OFF_LESION = 0.5
FLAG_SHARE = 0.2
MIN_AREA = 0.005
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclass
class ImageAttention:
    """One image: where it is (position among the audited rows, cache row, id), what it is and what
    the model decided, the share of the map's mass per region and each region's area (fraction of the
    image), and whether the lesion mask and the map were usable."""

    position: int
    row: int
    image_id: str
    true: int
    decision: int
    shares: dict[str, float]
    areas: dict[str, float]
    lesion_ok: bool
    lesion_reason: str | None
    empty: bool = False

    @property
    def correct(self) -> bool:
        return self.true == self.decision

    @property
    def off_lesion(self) -> bool:
        return self.lesion_ok and not self.empty and self.shares.get("off_lesion", 0.0) > OFF_LESION

    def to_dict(self, classes: Sequence[str]) -> dict[str, Any]:
        return {"image_id": self.image_id, "row": self.row, "true": classes[self.true],
                "decision": classes[self.decision], "shares": {k: round(v, 4) for k, v in self.shares.items()},
                "areas": {k: round(v, 4) for k, v in self.areas.items()}, "lesion_ok": self.lesion_ok,
                "lesion_reason": self.lesion_reason, "empty_map": self.empty, "off_lesion": self.off_lesion}


def wilson(k: int, n: int) -> list[float] | None:
    """Wilson's 95% score interval of the proportion ``k / n`` (None when ``n`` is 0): unlike the
    normal approximation it stays inside [0, 1] and is honest at 0 of 8 or 8 of 8."""
    if n <= 0:
        return None
    p = k / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def newcombe(k1: int, n1: int, k2: int, n2: int) -> list[float] | None:
    """Newcombe's 95% interval of ``k1/n1 - k2/n2`` from the two Wilson intervals (his method 10)."""
    a, b = wilson(k1, n1), wilson(k2, n2)
    if a is None or b is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    diff = p1 - p2
    return [diff - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2),
            diff + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2)]


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """n, mean and the :data:`QUANTILES` of ``values`` (None for each when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"n": 0, "mean": None, **{f"p{round(q * 100)}": None for q in QUANTILES}}
    return {"n": len(array), "mean": round(float(array.mean()), 4),
            **{f"p{round(q * 100)}": round(float(np.quantile(array, q)), 4) for q in QUANTILES}}


@dataclass
class AttentionResult:
    """Part 1 for a set of images: the method and layer(s) the maps came from, one
    :class:`ImageAttention` per image, and the summaries (:meth:`to_dict`)."""

    method: str
    layer: str
    classes: list[str]
    regions: tuple[str, ...]
    images: list[ImageAttention] = field(default_factory=list)
    seconds: float = 0.0

    def exists(self, image: ImageAttention, region: str) -> bool:
        """Whether ``region`` is there to be looked at in ``image`` (see the module's rules)."""
        if image.empty:
            return False
        if region == "off_lesion":
            return image.lesion_ok
        return image.areas.get(region, 0.0) >= MIN_AREA

    def region_summary(self, images: Sequence[ImageAttention]) -> dict[str, Any]:
        """Per region: the distribution of its share over the images where it exists, and how many of
        them it holds most of the attention in."""
        out = {}
        for region in self.regions:
            present = [i for i in images if self.exists(i, region)]
            most = sum(1 for i in present if i.shares.get(region, 0.0) > MOST)
            out[region] = {**distribution([i.shares.get(region, 0.0) for i in present]), "most": most,
                           "most_share": round(most / len(present), 4) if present else None}
        return out

    @property
    def flags(self) -> list[dict[str, Any]]:
        """The regions flagged over all images (see the module's rules), with their numbers."""
        found = []
        for region, summary in self.region_summary(self.images).items():
            if summary["most_share"] is not None and summary["most_share"] >= FLAG_SHARE:
                found.append({"region": region, "images": summary["n"], "most": summary["most"],
                              "most_share": summary["most_share"], "median_share": summary["p50"]})
        return found

    @property
    def off_lesion_images(self) -> list[ImageAttention]:
        """Images with most of the mass off a usable lesion mask, most off-lesion first (ties: id)."""
        chosen = [i for i in self.images if i.off_lesion]
        return sorted(chosen, key=lambda i: (-i.shares["off_lesion"], i.image_id))

    def errors(self) -> dict[str, Any]:
        """Error rates of the decisions on off-lesion images and on the rest (usable mask, non-empty map
        both), with Wilson intervals, their difference with Newcombe's interval, and a verdict."""
        judged = [i for i in self.images if i.lesion_ok and not i.empty]
        off = [i for i in judged if i.off_lesion]
        rest = [i for i in judged if not i.off_lesion]
        k1, k2 = sum(not i.correct for i in off), sum(not i.correct for i in rest)
        diff = newcombe(k1, len(off), k2, len(rest))
        if diff is None:
            verdict = "too few images to compare"
        elif diff[0] > 0:
            verdict = "more often wrong"
        elif diff[1] < 0:
            verdict = "less often wrong"
        else:
            verdict = "no clear difference"
        return {"off_lesion": {"n": len(off), "wrong": k1, "rate": round(k1 / len(off), 4) if off else None,
                               "ci": wilson(k1, len(off))},
                "rest": {"n": len(rest), "wrong": k2, "rate": round(k2 / len(rest), 4) if rest else None,
                         "ci": wilson(k2, len(rest))},
                "difference": round(k1 / len(off) - k2 / len(rest), 4) if off and rest else None,
                "difference_ci": diff, "verdict": verdict}

    def to_dict(self) -> dict[str, Any]:
        by_class = {}
        for c, name in enumerate(self.classes):
            members = [i for i in self.images if i.true == c]
            if members:
                by_class[name] = {"n": len(members), "regions": self.region_summary(members)}
        return {
            "method": self.method, "layer": self.layer, "n": len(self.images),
            "rules": {"most": MOST, "off_lesion": OFF_LESION, "flag_share": FLAG_SHARE, "min_area": MIN_AREA},
            "lesion_mask_failed": sum(not i.lesion_ok for i in self.images),
            "lesion_mask_reasons": _reasons(self.images),
            "empty_maps": sum(i.empty for i in self.images),
            "overall": self.region_summary(self.images), "by_class": by_class,
            "flags": self.flags, "off_lesion": {"count": len(self.off_lesion_images), **self.errors()},
            "seconds": round(self.seconds, 3),
            "images": [i.to_dict(self.classes) for i in self.images],
        }


def _reasons(images: Sequence[ImageAttention]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in images:
        if not i.lesion_ok:
            key = i.lesion_reason or "unknown"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def cam_layer(model: torch.nn.Module, sidecar: dict[str, Any]) -> str:
    """The layer(s) the maps come from, found before any image is read: an ensemble's members' default
    layers, else the model's; a model without a spatial feature map is one BadInputError line."""
    from dermcam.explain.ensemble import member_layers
    from dermcam.models.ensemble import EnsembleModel
    from dermcam.models.layers import find_target_layer

    try:
        if isinstance(model, EnsembleModel):
            layers = member_layers(model, None)
            return "; ".join(f"{m.get('id', k)}: {name}" for k, (m, name) in
                             enumerate(zip(sidecar.get("members") or [{}] * len(layers), layers)))
        return find_target_layer(model)
    except DermcamError as exc:
        raise BadInputError(f"cannot audit where the model looks: {exc} (--only stress audits its answers "
                            "without a CAM)") from None


def cache_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) maps at the model's input -> (B, H, W) at the cache image's ``size`` (H, W): bilinear,
    pixel centres, as every map in dermcam is resized."""
    import torch
    import torch.nn.functional as F

    if tuple(maps.shape[-2:]) == tuple(size):
        return np.asarray(maps, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0).numpy()


def batch_maps(model: torch.nn.Module, sidecar: dict[str, Any], pixels: np.ndarray, targets: Sequence[int],
               metadata: Any = None) -> np.ndarray:
    """The maps of ``targets`` for cache-sized ``pixels`` (B, H, W, 3), at the cache size: what
    ``dermcam explain`` and the report's gallery compute (:func:`dermcam.explain.ensemble.maps_for`)."""
    from dermcam.data.geometry import batch_input
    from dermcam.explain.ensemble import maps_for

    x = batch_input(np.asarray(pixels, dtype=np.uint8), sidecar["preprocessing"])
    maps = maps_for(model, x, METHOD, [int(t) for t in targets], metadata)
    return cache_maps(maps, tuple(pixels.shape[1:3]))


def audit_attention(model: torch.nn.Module, sidecar: dict[str, Any], images: np.ndarray, rows: np.ndarray,
                    y_true: np.ndarray, decisions: np.ndarray, *, image_ids: Sequence[str] | None = None,
                    metadata: Any = None, batch_size: int = 32, layer: str | None = None,
                    progress: Progress | None = None) -> AttentionResult:
    """Part 1 for cache rows ``rows`` of ``images`` with true classes ``y_true`` and the model's
    ``decisions`` (both as the model's class indices, aligned with ``rows``). ``metadata``: the rows'
    encoded patient metadata (:func:`dermcam.data.metadata.model_metadata`) for a model that reads it.
    Maps are computed ``batch_size`` images at a time; the regions one image at a time."""
    import time

    from dermcam.audit.detectors import REGIONS, mass_shares, region_masks
    from dermcam.explain.metadata import take

    layer = layer or cam_layer(model, sidecar)
    progress = progress or Progress()
    result = AttentionResult(METHOD, layer, list(sidecar["classes"]), tuple(REGIONS))
    ids = list(image_ids) if image_ids is not None else [str(r) for r in rows]
    started = time.perf_counter()
    progress.start("audit: where it looks", total=len(rows))
    try:
        for start in range(0, len(rows), batch_size):
            part = np.arange(start, min(start + batch_size, len(rows)))
            pixels = np.asarray(images[np.asarray(rows)[part]], dtype=np.uint8)
            chunk_meta = take(metadata, part) if metadata is not None else None
            maps = batch_maps(model, sidecar, pixels, decisions[part], chunk_meta)
            for j, position in enumerate(part):
                masks, lesion = region_masks(pixels[j])
                cam = maps[j]
                empty = not float(cam.sum()) > 0
                shares = {r: 0.0 for r in REGIONS} if empty else mass_shares(cam, masks)
                areas = {r: float(np.asarray(masks[r]).mean()) for r in REGIONS if r in masks}
                result.images.append(ImageAttention(int(position), int(rows[position]), str(ids[position]),
                                                    int(y_true[position]), int(decisions[position]),
                                                    {r: float(shares.get(r, 0.0)) for r in REGIONS}, areas,
                                                    bool(lesion.ok), lesion.reason, empty))
            progress.advance(len(part))
    finally:
        progress.finish()
    result.seconds = time.perf_counter() - started
    return result
