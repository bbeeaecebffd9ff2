"""``dermcam audit``: does a model look at the lesion, and does its answer depend on the photograph?

:func:`audit` opens a checkpoint (or an ensemble, or an exported file) and a prepared split as
``dermcam evaluate`` does, scores the split through evaluate's own path (the baseline), then runs the
two parts: where the attention goes (:mod:`dermcam.audit.attention`) and what changes the answer
(:mod:`dermcam.audit.stress`). :func:`audit_model` is the same audit for a model already loaded, with
its sidecar and cache rows (what the tests give synthetic models to).

What it writes into ``out_dir`` (by default the folder ``dermcam report`` writes that checkpoint's
report.html into, :func:`default_out_dir`, so the next report shows a "Shortcuts and robustness" section):

- ``audit.json`` (:data:`SCHEMA`): the checkpoint's identity, the data set, split, images, seed and
  versions, both parts' numbers (per image for the attention), the findings in words;
- ``audit/``: the two charts and a few examples per finding: photos of off-lesion images (the lesion
  mask outlined) beside their Grad-CAM, and before/after images of the perturbations that move the
  answer most. Every file is written atomically; the folder's earlier PNGs are replaced.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.checks import MAX_BATCH_SIZE, MAX_COUNT, SEED_MAX, check_int, check_output_dir
from dermcam.errors import BadInputError, CorruptError
from dermcam.evaluate.operating import applied
from dermcam.progress import Progress

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from dermcam.audit.attention import AttentionResult
    from dermcam.audit.stress import StressResult
    from dermcam.evaluate.operating import ModelOutputs

SCHEMA = "dermcam.audit/1"
AUDIT_FILE = "audit.json"
AUDIT_DIR = "audit"
PARTS = ("attention", "stress")
DEFAULT_OUT = Path("dermcam-report")  # dermcam.report.build.DEFAULT_OUT: the report's folder when not a run's
BATCH_SIZE = 32
OFF_LESION_EXAMPLES = 6  # the most off-lesion images shown with their maps
REGION_EXAMPLES = 3  # per other flagged region (border, vignette, ink)
STRESS_EXAMPLES = 4  # perturbations shown before/after, the one moving p(positive) most first
MIN_WIDTH = 256  # small caches (64x48 in the tests) are enlarged, as the report's gallery does
_EXAMPLE_NAME = re.compile(r"(attention|stress)[-\w.]*\.png")


@dataclass
class AuditResult:
    """What :func:`audit` measured and wrote; :meth:`to_dict` is audit.json and ``--json``."""

    checkpoint: dict[str, Any]
    dataset: str
    split: str
    n: int
    available: int
    limit: int | None
    seed: int
    classes: list[str]
    positive: str
    calibration: dict[str, Any] | None
    operating_point: dict[str, Any] | None
    versions: dict[str, str]
    parts: tuple[str, ...]
    attention: AttentionResult | None = None
    stress: StressResult | None = None
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    created: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    baseline: ModelOutputs | None = None  # the unperturbed outputs: evaluate's for the same rows
    image_ids: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.checkpoint.get('id')} on {self.dataset}/{self.split}"

    def findings(self) -> list[str]:
        """The audit in sentences, the first thing a reader sees (CLI, audit.json, report.html)."""
        return attention_findings(self.attention) + stress_findings(self.stress)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "created": self.created, "checkpoint": self.checkpoint,
                "dataset": self.dataset, "split": self.split, "n": self.n, "available": self.available,
                "limit": self.limit, "seed": self.seed, "classes": self.classes, "positive_class": self.positive,
                "calibration": self.calibration, "operating_point": self.operating_point,
                "versions": self.versions, "parts": list(self.parts), "findings": self.findings(),
                "attention": self.attention.to_dict() if self.attention else None,
                "stress": self.stress.to_dict() if self.stress else None,
                "examples": self.examples, "seconds": self.seconds,
                "out_dir": str(self.out_dir) if self.out_dir else None,
                "files": [str(p) for p in self.files], "warnings": self.warnings}


def signed(value: float, digits: int = 3) -> str:
    """``+0.123`` / ``-0.045``: a change with its sign, never ``-0.000`` or ``+0.000`` for what rounds to zero."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def _pct(k: int, n: int) -> str:
    return f"{k / n:.0%}" if n else "-"


def attention_findings(attention: AttentionResult | None) -> list[str]:
    """One line per flagged region, or one saying none is; one on whether off-lesion images fail more."""
    if attention is None:
        return []
    lines = []
    words = {"border": "on the border band", "vignette": "on the dark vignette", "ink": "on ink-like marks",
             "off_lesion": "off the lesion"}
    for flag in attention.flags:
        lines.append(f"Attention: most of the map lies {words.get(flag['region'], flag['region'])} in "
                     f"{flag['most']} of {flag['images']} images ({_pct(flag['most'], flag['images'])}).")
    if not lines:
        lines.append("Attention: stable: no region holds most of the map in a fifth of the images where it exists.")
    errors = attention.errors()
    off, rest = errors["off_lesion"], errors["rest"]
    if off["n"] and rest["n"]:
        lines.append(f"Off-lesion images ({off['n']}): {errors['verdict']}; error rate {off['rate']:.0%} vs "
                     f"{rest['rate']:.0%} on the other {rest['n']}.")
    failed = sum(not i.lesion_ok for i in attention.images)
    if failed:
        lines.append(f"The lesion mask failed on {failed} of {len(attention.images)} images (not judged off-lesion).")
    return lines


def stress_findings(stress: StressResult | None) -> list[str]:
    """"Stable" in one line when every perturbation is; else one line per perturbation that moves it."""
    if stress is None:
        return []
    moving = stress.moving()
    if not moving:
        return [(f"Perturbations: stable: none of {len(stress.results)} moves p({stress.positive}) by 0.02 on "
                 "average or flips 2% of the decisions.")]
    lines = []
    for r in moving:
        flips = int(r.flipped.sum())
        lines.append(f"{r.name}: p({stress.positive}) {signed(r.mean_delta)} on average (|change| "
                     f"{r.mean_abs_delta:.3f}); {flips} of {r.n} decisions flip ({_pct(flips, r.n)})"
                     + (f"; {r.direction}" if r.direction else "") + ".")
    stable = [r.name for r in stress.results if r.stable]
    if stable:
        lines.append(f"Stable: {', '.join(stable)}.")
    return lines


def check_options(*, split: str = "test", limit: int | None = None, seed: int = 0,
                  parts: Sequence[str] = PARTS, perturbations: Sequence[str] | None = None,
                  batch_size: int = BATCH_SIZE) -> tuple[tuple[str, ...], list[str]]:
    """Every option checked before any work (one BadInputError line each); returns the parts and the
    perturbation names to run, in their canonical order, without repeats."""
    from dermcam.audit.perturb import PERTURBATIONS

    if split not in ("train", "val", "test"):
        raise BadInputError(f"--split must be train, val or test, not {split!r}")
    if limit is not None:
        check_int(limit, "--limit", 1, MAX_COUNT)
    check_int(seed, "--seed", 0, SEED_MAX)
    check_int(batch_size, "--batch-size", 1, MAX_BATCH_SIZE)
    chosen = tuple(p for p in PARTS if p in set(parts or ()))
    unknown = [p for p in parts or () if p not in PARTS]
    if unknown or not chosen:
        what = repr(unknown[0]) if unknown else "(nothing)"
        raise BadInputError(f"--only {what}: choose attention or stress")
    names = list(PERTURBATIONS) if perturbations is None else list(perturbations)
    bad = [n for n in names if n not in PERTURBATIONS]
    if bad:
        raise BadInputError(f"unknown perturbation {bad[0]!r}; choose from {', '.join(PERTURBATIONS)}")
    if not names and "stress" in chosen:
        raise BadInputError("--perturbation: no perturbation chosen")
    return chosen, [n for n in PERTURBATIONS if n in set(names)]


def sample_rows(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Positions of the rows audited: all, or ``limit`` drawn without replacement with ``seed`` (kept in
    the split's order), so a quick audit looks at a spread of the split, not at its first images."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def audit_model(model: torch.nn.Module, sidecar: dict[str, Any], images: np.ndarray, rows: np.ndarray,
                y_true: np.ndarray, *, image_ids: Sequence[str] | None = None, metadata: Any = None,
                dataset: str = "", split: str = "", seed: int = 0, parts: Sequence[str] = PARTS,
                perturbations: Sequence[str] | None = None, batch_size: int = BATCH_SIZE, device: Any = "cpu",
                out_dir: Path | None = None, progress: Progress | None = None,
                warnings: Sequence[str] = (), available: int | None = None, limit: int | None = None,
                compile: bool = False) -> AuditResult:
    """The audit of a loaded ``model`` with its ``sidecar`` on cache rows ``rows`` of ``images`` (uint8
    N x H x W x 3, e.g. a prepared set's memory map) whose true classes are ``y_true`` (the model's class
    indices). ``metadata``: the rows' encoded patient metadata for a model that reads it. With
    ``out_dir``: audit.json and the audit/ folder (see the module docstring). ``compile``: torch.compile
    for the scoring passes (baseline and perturbations; Grad-CAM runs eagerly), falling back to eager with
    one warning."""
    from dermcam.audit.attention import audit_attention, cam_layer
    from dermcam.audit.stress import audit_stress, positive_class, score
    from dermcam.explain.pipeline import checkpoint_identity
    from dermcam.store.files import utc_now

    chosen, names = check_options(limit=limit, seed=seed, parts=parts, perturbations=perturbations,
                                  batch_size=batch_size)
    rows = np.asarray(rows, dtype=np.int64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(rows) == 0:
        raise BadInputError(f"nothing to audit: split '{split or '?'}' of data set '{dataset or '?'}' has no image")
    if len(y_true) != len(rows):
        raise BadInputError(f"{len(y_true)} labels for {len(rows)} images")
    layer = cam_layer(model, sidecar) if "attention" in chosen else None  # no CAM layer: refused before any image
    if out_dir is not None:
        out_dir = check_output_dir(out_dir, "--out")
    progress = progress or Progress()
    classes = list(sidecar["classes"])
    c = positive_class(sidecar)
    result = AuditResult(checkpoint_identity(sidecar), dataset, split, len(rows),
                         len(rows) if available is None else available, limit, seed, classes, classes[c],
                         *applied(sidecar), _versions(), chosen, warnings=list(warnings),
                         created=utc_now())
    started = time.perf_counter()
    compile_notes: list[str] = []
    baseline = score(model, sidecar, images, rows, device=device, batch_size=batch_size, metadata=metadata,
                     progress=progress, description="audit: baseline", compile=compile, notes=compile_notes)
    result.seconds["baseline"] = round(time.perf_counter() - started, 3)
    result.baseline = baseline
    result.image_ids = [str(i) for i in image_ids] if image_ids is not None else [str(r) for r in rows]
    if "attention" in chosen:
        result.attention = audit_attention(model, sidecar, images, rows, y_true, baseline.decisions,
                                           image_ids=image_ids, metadata=metadata, batch_size=batch_size,
                                           layer=layer, progress=progress)
        result.seconds["attention"] = round(result.attention.seconds, 3)
    if "stress" in chosen:
        result.stress = audit_stress(model, sidecar, images, rows, baseline, names=names, seed=seed,
                                     metadata=metadata, batch_size=batch_size, device=device, progress=progress,
                                     compile=compile and not compile_notes, notes=compile_notes)
        result.seconds["stress"] = round(result.stress.seconds, 3)
    result.warnings.extend(compile_notes[:1])  # a failed --compile, said once
    if out_dir is not None:
        result.out_dir = Path(out_dir)
        write_audit(result, model, sidecar, images, rows, baseline.probs, metadata, image_ids)
    return result


def _versions() -> dict[str, str]:
    from dermcam.store.checkpoint import versions

    return versions()


def default_out_dir(ckpt: Any, sidecar: dict[str, Any], dataset: str, split: str) -> Path:
    """Where ``dermcam report`` writes this checkpoint's report.html (its rule, :func:`dermcam.report.build.report`):
    the run's ``report/`` folder for a run's best checkpoint on its own test split, else ./dermcam-report."""
    from dermcam.store.runs import read_run

    own = ckpt is not None and split == "test" and dataset == (sidecar.get("dataset") or {}).get("name")
    return ckpt.run_dir / "report" if own and read_run(ckpt.run_dir).get("best") == ckpt.id else DEFAULT_OUT


def audit(ref: str | Path | None = None, *, dataset: str | None = None, split: str = "test",
          limit: int | None = None, seed: int = 0, out_dir: Path | None = None, parts: Sequence[str] = PARTS,
          perturbations: Sequence[str] | None = None, batch_size: int = BATCH_SIZE, threads: int | str | None = None,
          device: str = "auto", compile: bool = False, root: Path | None = None,
          progress: Progress | None = None) -> AuditResult:
    """Audit a checkpoint, ensemble (``ensemble:NAME``) or exported file (``ref``; default: the best) on
    ``split`` of ``dataset`` (default: the set it was trained on; any prepared set, classes matched by name
    as evaluate matches them; images of classes the model does not know are left out).

    ``limit``: audit that many images of the split, drawn with ``seed`` (default: all). ``seed`` also
    seeds every perturbation. ``parts``: ``attention`` and/or ``stress``. ``perturbations``: names of
    :data:`dermcam.audit.perturb.PERTURBATIONS` (default: all). ``out_dir``: default
    :func:`default_out_dir`. ``threads``: torch CPU threads (auto: the idle cores; None keeps torch's).
    ``compile``: torch.compile for the baseline and perturbation passes (see :func:`audit_model`).

    One-line errors: an unknown perturbation, ``limit`` under 1 and other bad values (exit 2, before any
    work); a model without a spatial layer to explain, unless ``parts`` is ``("stress",)`` (exit 2); a
    split with no image of the model's classes (exit 2); an unknown checkpoint or data set (exit 3).
    A set cached at another size than the model's is audited as evaluate scores it (the cache image
    resized to the model's input), with a warning.
    """
    from dermcam.data.geometry import cache_size
    from dermcam.data.metadata import model_metadata
    from dermcam.evaluate.evaluation import scored_split
    from dermcam.models.device import apply_threads, select_device
    from dermcam.store.ensembles import ensemble_name
    from dermcam.store.exported import is_exported_file
    from dermcam.store.inference import load_for_inference
    from dermcam.store.references import find_checkpoint

    check_options(split=split, limit=limit, seed=seed, parts=parts, perturbations=perturbations,
                  batch_size=batch_size)
    if out_dir is not None:
        check_output_dir(out_dir, "--out")
    if threads is not None:
        apply_threads(threads)  # checked before any work, set before the model's first torch op
    ensemble = ensemble_name(ref, root)
    found = None if ensemble is not None or (ref is not None and is_exported_file(ref)) else find_checkpoint(ref, root)
    ckpt = found.checkpoint if found else None
    notes = list(found.warnings) if found else []
    model, sidecar = load_for_inference(ckpt.sidecar_path if ckpt else ref, root, notes=notes)
    trained_on = (sidecar.get("dataset") or {}).get("name")
    target = check_output_dir(Path(out_dir) if out_dir is not None else
                              default_out_dir(ckpt, sidecar, str(dataset or trained_on), split), "--out")
    if "attention" in parts:
        from dermcam.audit.attention import cam_layer

        cam_layer(model, sidecar)  # a model without a CAM layer is refused before the data set is read
    scored = scored_split(sidecar, dataset, split, root)
    data = scored.data
    warnings = notes + scored.warnings
    height, width = data.images.shape[1:3]
    want_w, want_h = cache_size(sidecar["preprocessing"])
    if (width, height) != (want_w, want_h):
        warnings.append(f"data set '{data.name}' caches {width}x{height} images, the model was trained on {want_w}x"
                        f"{want_h}: they are resized to its input as evaluate does"
                        + ("" if abs(width / height - want_w / want_h) < 0.01 else
                           ", squashed to another aspect ratio; prepare the set with --cache-size "
                           f"{want_w}x{want_h} to audit what the model was trained to see"))
    chosen = sample_rows(len(scored.rows), limit, seed)
    index = scored.index.iloc[chosen].reset_index(drop=True)
    dev = select_device(device)
    model.to(dev)
    return audit_model(model, sidecar, data.images, scored.rows[chosen], scored.y_true[chosen],
                       image_ids=[str(i) for i in index["image_id"]], metadata=model_metadata(sidecar, index),
                       dataset=data.name, split=split, seed=seed, parts=parts, perturbations=perturbations,
                       batch_size=batch_size, device=dev, out_dir=target, progress=progress, warnings=warnings,
                       available=len(scored.rows), limit=limit, compile=compile)


# --- what is written -------------------------------------------------------------------------------------


def _enlarged(pixels: np.ndarray) -> Image.Image:
    from PIL import Image

    photo = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    scale = math.ceil(MIN_WIDTH / photo.width)
    if scale > 1:
        photo = photo.resize((photo.width * scale, photo.height * scale), Image.Resampling.NEAREST)
    return photo


def _outlined(photo: Image.Image, mask: np.ndarray) -> Image.Image:
    """``photo`` with the outline of ``mask`` (at the cache size) drawn in white: the lesion the
    off-lesion share is measured against."""
    from PIL import Image
    from scipy import ndimage

    if not mask.any():
        return photo
    edge = mask & ~ndimage.binary_erosion(mask)
    big = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).resize(photo.size, Image.Resampling.NEAREST)) > 0
    pixels = np.array(photo.convert("RGB"))
    pixels[big] = (255, 255, 255)
    return Image.fromarray(pixels)


def _clear_examples(folder: Path) -> None:
    """Remove the PNGs an earlier audit wrote here (only names this module writes)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and _EXAMPLE_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _attention_examples(attention: AttentionResult) -> list[tuple[str, Any]]:
    """(finding, image) pairs to show: the most off-lesion images, then for each other flagged region
    the images it holds most of the attention in, each image once."""
    from dermcam.audit.attention import MOST

    chosen: list[tuple[str, Any]] = [("off_lesion", i) for i in attention.off_lesion_images[:OFF_LESION_EXAMPLES]]
    seen = {i.position for _, i in chosen}
    for flag in attention.flags:
        region = flag["region"]
        if region == "off_lesion":
            continue
        ranked = sorted((i for i in attention.images if not i.empty and i.shares.get(region, 0.0) > MOST),
                        key=lambda i: (-i.shares[region], i.image_id))
        for image in ranked[:REGION_EXAMPLES]:
            if image.position not in seen:
                seen.add(image.position)
                chosen.append((region, image))
    return chosen


def write_audit(result: AuditResult, model: torch.nn.Module, sidecar: dict[str, Any], images: np.ndarray,
                rows: np.ndarray, probs: np.ndarray, metadata: Any = None,
                image_ids: Sequence[str] | None = None) -> list[Path]:
    """audit.json, the charts and the examples into ``result.out_dir`` (see the module docstring)."""
    from dermcam.audit.figures import plot_attention, plot_stress
    from dermcam.store.files import atomic_write_json

    assert result.out_dir is not None
    folder = result.out_dir / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _clear_examples(folder)
    files: list[Path] = []
    result.examples = {"attention": [], "stress": []}
    if result.attention is not None:
        files.append(plot_attention(result.attention, folder / "attention.png", result.title))
        files += _write_attention_examples(result, model, sidecar, images, rows, probs, metadata, folder)
    if result.stress is not None:
        files.append(plot_stress(result.stress, folder / "stress.png", result.title))
        files += _write_stress_examples(result, images, rows, folder, image_ids)
    result.files = [*files, result.out_dir / AUDIT_FILE]
    atomic_write_json(result.out_dir / AUDIT_FILE, result.to_dict())
    return result.files


def _write_attention_examples(result: AuditResult, model: torch.nn.Module, sidecar: dict[str, Any],
                              images: np.ndarray, rows: np.ndarray, probs: np.ndarray, metadata: Any,
                              folder: Path) -> list[Path]:
    from dermcam.audit.attention import batch_maps
    from dermcam.audit.detectors import region_masks
    from dermcam.explain.metadata import take
    from dermcam.explain.render import render_overlay, save_png

    assert result.attention is not None
    chosen = _attention_examples(result.attention)
    if not chosen:
        return []
    positions = np.array([image.position for _, image in chosen])
    pixels = np.asarray(images[rows[positions]], dtype=np.uint8)
    maps = batch_maps(model, sidecar, pixels, [image.decision for _, image in chosen],
                      take(metadata, positions) if metadata is not None else None)
    files = []
    for k, ((finding, image), pix, cam) in enumerate(zip(chosen, pixels, maps), start=1):
        _, lesion = region_masks(pix)
        answer = result.classes[image.decision]
        photo = _enlarged(pix)
        overlay = render_overlay(photo, cam, label=answer, probability=float(probs[image.position, image.decision]),
                                 note=f"{finding.replace('_', '-')} {image.shares[finding]:.0%}")
        stem = f"attention-{k:02d}"
        files += [save_png(_outlined(photo, lesion.mask if lesion.ok else np.zeros(pix.shape[:2], bool)),
                           folder / f"{stem}.photo.png"),
                  save_png(overlay, folder / f"{stem}.cam.png")]
        result.examples["attention"].append({
            "finding": finding, "image_id": image.image_id, "share": round(image.shares[finding], 4),
            "shares": {r: round(v, 4) for r, v in image.shares.items()}, "true": result.classes[image.true],
            "decision": answer, "correct": image.correct, "lesion_ok": image.lesion_ok,
            "photo": f"{AUDIT_DIR}/{stem}.photo.png", "overlay": f"{AUDIT_DIR}/{stem}.cam.png"})
    return files


def _write_stress_examples(result: AuditResult, images: np.ndarray, rows: np.ndarray, folder: Path,
                           image_ids: Sequence[str] | None) -> list[Path]:
    from dermcam.audit.stress import lesion_masks, perturbed
    from dermcam.explain.render import save_png

    assert result.stress is not None
    files = []
    for r in result.stress.moving()[:STRESS_EXAMPLES]:
        position = r.example()
        if position is None:
            continue
        pixels = np.asarray(images[rows[[position]]], dtype=np.uint8)
        after = perturbed(pixels, r.name, [int(rows[position])], result.seed, lesion_masks(pixels))[0]
        stem = f"stress-{r.name}"
        files += [save_png(_enlarged(pixels[0]), folder / f"{stem}.before.png"),
                  save_png(_enlarged(after), folder / f"{stem}.after.png")]
        image_id = str(image_ids[position]) if image_ids is not None else str(int(rows[position]))
        result.examples["stress"].append({
            "perturbation": r.name, "image_id": image_id, "row": int(rows[position]),
            "p_before": round(float(result.stress.baseline_probs[position]), 4),
            "p_after": round(float(result.stress.after_probs[r.name][position]), 4),
            "decision_before": result.classes[int(r.before[position])],
            "decision_after": result.classes[int(r.after[position])],
            "before": f"{AUDIT_DIR}/{stem}.before.png", "after": f"{AUDIT_DIR}/{stem}.after.png"})
    return files


def read_audit(folder: Path) -> dict[str, Any] | None:
    """The audit.json in ``folder`` with the PNGs it names (``images``: relative name -> bytes), for
    report.html; None when there is none. A damaged file is a one-line CorruptError; a PNG it names
    that is missing is left out (the page shows the numbers without it). Only files inside
    ``folder/audit/`` are read, whatever the JSON says."""
    from dermcam.store.files import read_json

    path = Path(folder) / AUDIT_FILE
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{path} cannot be read ({exc}); run dermcam audit again") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise CorruptError(f"{path} is not a dermcam audit ({SCHEMA}); run dermcam audit again")
    base = (Path(folder) / AUDIT_DIR).resolve()
    wanted = []
    for entries in (doc.get("examples") or {}).values():
        for entry in entries if isinstance(entries, list) else []:
            wanted += [v for k, v in entry.items() if k in ("photo", "overlay", "before", "after") and isinstance(v, str)]
    wanted += [f"{AUDIT_DIR}/attention.png", f"{AUDIT_DIR}/stress.png"]
    images = {}
    for name in wanted:
        file = (Path(folder) / name).resolve()
        if file.parent == base and _EXAMPLE_NAME.fullmatch(file.name) and file.is_file():
            images[name] = file.read_bytes()
    return {**doc, "images": images}
