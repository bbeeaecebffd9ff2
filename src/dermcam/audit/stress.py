"""Part 2 of the audit: what changes the answer. Every image is perturbed (a painted artefact, an
acquisition change: :mod:`dermcam.audit.perturb`) and scored again, and the calibrated probabilities and
decisions are compared with the unperturbed ones.

Scoring goes through the one path ``dermcam evaluate`` uses (:func:`score`: the prediction of
:func:`dermcam.evaluate.predict.predict` and :func:`dermcam.evaluate.operating.model_outputs`, with the
calibration and the operating point), so the unperturbed baseline is exactly what ``evaluate`` reports
for the same rows, and a decision "flips" exactly when ``evaluate``'s decision for the perturbed image
would differ.

What is measured, per perturbation, on the *positive class* (:func:`positive_class`: the operating
point's class; without one ``mel`` when the model has it; else its first class):

- the change of its calibrated probability, ``p(perturbed) - p(original)``: the mean with a 95% normal
  interval (mean +/- 1.96 standard errors; images are treated as independent), and the mean absolute
  change (changes in both directions cancel in the mean, not in this);
- the share of decisions that flip (any class to any other), with a Wilson 95% interval, per class of
  the original decision, and how many flips go to and from the positive class;
- for artefacts, the direction: "raises p(mel)" when the interval of the mean change lies above zero,
  "lowers p(mel)" below, else "no clear direction".

The rule for a *stable* line (:func:`is_stable`): the mean absolute change is under
:data:`STABLE_DELTA` (0.02) and fewer than :data:`STABLE_FLIPS` (2%) of the decisions flip. Two
hundredths of probability is below what calibration itself can promise, and one decision in fifty is
the smallest share a 1,000-image split measures to within a percent; anything above is reported with
its numbers and an example.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from dermcam.audit.attention import Z95, wilson
from dermcam.progress import Progress

if TYPE_CHECKING:
    import torch

    from dermcam.evaluate.operating import ModelOutputs

T = TypeVar("T")
STABLE_DELTA = 0.02
STABLE_FLIPS = 0.02


def positive_class(sidecar: dict[str, Any]) -> int:
    """The class whose probability the stress test follows (see the module docstring)."""
    classes = [str(c) for c in sidecar["classes"]]
    point = sidecar.get("operating_point") if sidecar.get("calibration") else None
    if point and point.get("class") in classes:
        return classes.index(point["class"])
    lower = [c.lower() for c in classes]
    return lower.index("mel") if "mel" in lower else 0


def score(model: torch.nn.Module, sidecar: dict[str, Any], images: np.ndarray, rows: np.ndarray, *, device: Any,
          batch_size: int = 64, metadata: Any = None, progress: Progress | None = None,
          description: str = "predict", compile: bool = False, notes: list[str] | None = None) -> ModelOutputs:
    """Calibrated probabilities and decisions for cache rows ``rows`` of ``images``, through evaluate's
    own path (:func:`dermcam.evaluate.predict.calibrated_outputs`) at evaluate's default precision.
    ``compile``/``notes``: as :func:`dermcam.evaluate.predict.predict` (torch caches the compiled graph
    per model, so calling this once per perturbation compiles once per batch shape, not per call)."""
    from dermcam.evaluate.predict import calibrated_outputs
    from dermcam.models.device import resolve_precision

    outputs, _ = calibrated_outputs(model, sidecar, images, rows, device=device, batch_size=batch_size,
                                    precision=resolve_precision("auto", device, scoring=True), progress=progress,
                                    description=description, metadata=metadata, compile=compile, notes=notes)
    return outputs


def is_stable(mean_abs_delta: float, flip_share: float) -> bool:
    return mean_abs_delta < STABLE_DELTA and flip_share < STABLE_FLIPS


def mean_interval(values: np.ndarray) -> list[float] | None:
    """The mean's 95% normal interval (None for fewer than two values)."""
    if len(values) < 2:
        return None
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    mean = float(np.mean(values))
    return [round(mean - half, 6), round(mean + half, 6)]


@dataclass
class PerturbationResult:
    """One perturbation over every audited image: the changes of p(positive) and of the decisions."""

    name: str
    kind: str
    description: str
    positive: str
    delta: np.ndarray  # p(positive) perturbed - original, per image
    before: np.ndarray  # decisions, per image
    after: np.ndarray
    classes: list[str]

    @property
    def n(self) -> int:
        return len(self.delta)

    @property
    def mean_delta(self) -> float:
        return float(self.delta.mean()) if self.n else 0.0

    @property
    def mean_abs_delta(self) -> float:
        return float(np.abs(self.delta).mean()) if self.n else 0.0

    @property
    def flipped(self) -> np.ndarray:
        return self.before != self.after

    @property
    def flip_share(self) -> float:
        return float(self.flipped.mean()) if self.n else 0.0

    @property
    def stable(self) -> bool:
        return is_stable(self.mean_abs_delta, self.flip_share)

    @property
    def direction(self) -> str | None:
        """For an artefact: whether it makes the positive class more likely (None for acquisition changes)."""
        if self.kind != "artefact":
            return None
        ci = mean_interval(self.delta)
        if ci is not None and ci[0] > 0:
            return f"raises p({self.positive})"
        if ci is not None and ci[1] < 0:
            return f"lowers p({self.positive})"
        return "no clear direction"

    def example(self) -> int | None:
        """The position of the image it moves most: a flipped one first, then the largest change."""
        if not self.n:
            return None
        order = np.lexsort((-np.abs(self.delta), ~self.flipped))
        return int(order[0])

    def to_dict(self) -> dict[str, Any]:
        c = self.classes.index(self.positive)
        by_class = {}
        for k, name in enumerate(self.classes):
            decided = self.before == k
            if decided.any():
                by_class[name] = {"n": int(decided.sum()), "flipped": int(self.flipped[decided].sum())}
        flips = int(self.flipped.sum())
        return {"name": self.name, "kind": self.kind, "description": self.description, "n": self.n,
                "mean_delta": round(self.mean_delta, 6), "mean_delta_ci": mean_interval(self.delta),
                "mean_abs_delta": round(self.mean_abs_delta, 6),
                "max_abs_delta": round(float(np.abs(self.delta).max()), 6) if self.n else 0.0,
                "flipped": flips, "flip_share": round(self.flip_share, 6), "flip_ci": wilson(flips, self.n),
                "flipped_by_class": by_class,
                "to_positive": int((self.flipped & (self.after == c)).sum()),
                "from_positive": int((self.flipped & (self.before == c)).sum()),
                "direction": self.direction, "stable": self.stable}


@dataclass
class StressResult:
    """Part 2: the baseline (unperturbed) outputs and one :class:`PerturbationResult` per perturbation."""

    positive: str
    classes: list[str]
    seed: int
    baseline_probs: np.ndarray
    baseline_decisions: np.ndarray
    results: list[PerturbationResult] = field(default_factory=list)
    after_probs: dict[str, np.ndarray] = field(default_factory=dict)  # per perturbation, p(positive) after
    seconds: float = 0.0

    def moving(self) -> list[PerturbationResult]:
        """The perturbations that are not stable, the one that moves p(positive) most first."""
        return sorted((r for r in self.results if not r.stable), key=lambda r: (-r.mean_abs_delta, r.name))

    def to_dict(self) -> dict[str, Any]:
        return {"positive_class": self.positive, "seed": self.seed, "n": len(self.baseline_decisions),
                "rules": {"stable_mean_abs_delta": STABLE_DELTA, "stable_flip_share": STABLE_FLIPS},
                "baseline": {"decided": {name: int((self.baseline_decisions == k).sum())
                                         for k, name in enumerate(self.classes)},
                             f"mean_p_{self.positive}": round(float(self.baseline_probs.mean()), 6)
                             if len(self.baseline_probs) else None},
                "perturbations": [r.to_dict() for r in self.results],
                "stable": [r.name for r in self.results if r.stable],
                "moving": [r.name for r in self.moving()], "seconds": round(self.seconds, 3)}


def lesion_masks(pixels: np.ndarray) -> list[np.ndarray | None]:
    """Each image's lesion mask where the rule worked (None where it did not): where an ink mark is
    drawn beside the lesion (:func:`dermcam.audit.perturb.perturb`)."""
    from dermcam.audit.detectors import lesion_mask

    out: list[np.ndarray | None] = []
    for image in pixels:
        lesion = lesion_mask(image)
        out.append(lesion.mask if lesion.ok else None)
    return out


def perturbed(pixels: np.ndarray, name: str, rows: Sequence[int], seed: int,
              lesions: Sequence[np.ndarray | None]) -> np.ndarray:
    """The batch ``pixels`` with perturbation ``name`` applied to each image; image ``i`` gets the random
    draw of (``seed``, its cache row ``rows[i]``, the perturbation): the same image, seed and
    perturbation give the same bytes in any batch, with or without ``--limit``."""
    from dermcam.audit.perturb import perturb

    return np.stack([perturb(image, name, seed=seed, index=int(row), lesion=lesion)
                     for image, row, lesion in zip(pixels, rows, lesions)])


def perturbed_batches(images: np.ndarray, rows: np.ndarray, names: Sequence[str], seed: int,
                      batch_size: int) -> Iterator[tuple[np.ndarray, str, np.ndarray]]:
    """(positions in ``rows``, perturbation, perturbed pixels) for each batch and perturbation in turn:
    each batch is read and its lesion masks found once, for all its perturbations."""
    for start in range(0, len(rows), batch_size):
        part = np.arange(start, min(start + batch_size, len(rows)))
        pixels = np.asarray(images[rows[part]], dtype=np.uint8)
        lesions = lesion_masks(pixels)
        for name in names:
            yield part, name, perturbed(pixels, name, rows[part], seed, lesions)


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items`` in order, the next one made in a worker thread while the caller works on this one.

    Why: the model's forward pass keeps torch's threads busy only part of the time, and perturbing a
    batch (numpy and Pillow, which release the GIL) is about a tenth of the audit's work; overlapping
    the two made the stress part about 5% faster on the 2-core VM (docs/audit.md, "Cost"). The work and
    its order are unchanged, so the results are the same bytes as without the thread; an error in the
    worker is raised here, in turn.
    """
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dermcam-perturb") as pool:
        pending = pool.submit(next, items, done)
        while True:
            item = pending.result()
            if item is done:
                return
            pending = pool.submit(next, items, done)
            yield item


def audit_stress(model: torch.nn.Module, sidecar: dict[str, Any], images: np.ndarray, rows: np.ndarray,
                 baseline: ModelOutputs, *, names: Sequence[str], seed: int = 0, metadata: Any = None,
                 batch_size: int = 32, device: Any = "cpu", progress: Progress | None = None,
                 compile: bool = False, notes: list[str] | None = None) -> StressResult:
    """Part 2 for cache rows ``rows`` of ``images`` whose unperturbed outputs are ``baseline`` (from
    :func:`score`). Images are read once per batch; each perturbation of the batch is one forward pass.
    ``compile``/``notes``: as :func:`score`."""
    from dermcam.audit.perturb import PERTURBATIONS
    from dermcam.explain.metadata import take

    classes = list(sidecar["classes"])
    c = positive_class(sidecar)
    rows = np.asarray(rows)
    n = len(rows)
    after = {name: np.empty(n, dtype=np.float64) for name in names}
    decided = {name: np.empty(n, dtype=np.int64) for name in names}
    progress = progress or Progress()
    started = time.perf_counter()
    progress.start("audit: what changes the answer", total=n * len(names))
    try:
        for part, name, moved in prefetched(perturbed_batches(images, rows, names, seed, batch_size)):
            chunk_meta = take(metadata, part) if metadata is not None else None
            out = score(model, sidecar, moved, np.arange(len(part)), device=device, batch_size=len(part),
                        metadata=chunk_meta, compile=compile and not notes, notes=notes)  # failed once: eager
            after[name][part] = out.probs[:, c]
            decided[name][part] = out.decisions
            progress.advance(len(part))
    finally:
        progress.finish()
    base_p = np.asarray(baseline.probs[:, c], dtype=np.float64)
    base_d = np.asarray(baseline.decisions, dtype=np.int64)
    result = StressResult(classes[c], classes, seed, base_p, base_d, after_probs=after)
    for name in names:
        spec = PERTURBATIONS[name]
        result.results.append(PerturbationResult(name, spec.kind, spec.description, classes[c], after[name] - base_p,
                                                 base_d, decided[name], classes))
    result.seconds = time.perf_counter() - started
    return result
