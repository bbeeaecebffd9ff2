"""Writing report.html into an evaluation's folder, and ``dermcam report``.

The page is built from the files ``evaluate --out`` writes (metrics.json, predictions.csv, the PNGs),
the checkpoint (its sidecar, and its model for the gallery's overlays) and the data sets' manifests.
Building from the files, not from an in-memory result, is what lets ``dermcam report`` regenerate a
page without evaluating again when the folder's evaluation is still the checkpoint's current one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.checks import check_output_dir
from dermcam.data.overlap import OVERLAP_THRESHOLD
from dermcam.errors import BadInputError, DermcamError, NotFoundError
from dermcam.progress import Progress
from dermcam.report.sections import FIGURE_FILES, ReportInputs, render
from dermcam.store.files import atomic_write_bytes, read_json, utc_now

REPORT_FILE = "report.html"
DEFAULT_OUT = Path("dermcam-report")


def write_html_report(out_dir: Path, ref: str | Path | None = None, *, root: Path | None = None) -> Path:
    """Write ``out_dir/report.html`` for the evaluation in ``out_dir`` of checkpoint ``ref`` (anything
    :func:`dermcam.store.inference.load_for_inference` accepts); returns its path."""
    from dermcam.store.inference import load_for_inference

    model, sidecar = load_for_inference(ref, root)
    return _write(Path(out_dir), model, sidecar, root)


def _write(out_dir: Path, model: Any, sidecar: dict[str, Any], root: Path | None) -> Path:
    import pandas as pd

    from dermcam.data.dataset import load_prepared
    from dermcam.report.gallery import build_gallery
    from dermcam.store.checkpoint import versions

    metrics = _read_metrics(out_dir)
    if metrics.get("checkpoint") not in (None, sidecar["id"]):
        raise BadInputError(f"{out_dir} holds the evaluation of checkpoint {metrics['checkpoint']}, not of "
                            f"{sidecar['id']}; evaluate into another folder")
    data = load_prepared(metrics["dataset"], root)
    predictions = pd.read_csv(out_dir / "predictions.csv", dtype=str, keep_default_na=False)
    trained_on = (sidecar.get("dataset") or {}).get("name")
    inputs = ReportInputs(
        metrics=metrics, sidecar=sidecar, evaluated=data.manifest,
        training=data.manifest if trained_on == data.name else _manifest(trained_on, root),
        figures={name: (out_dir / name).read_bytes() for name in FIGURE_FILES if (out_dir / name).is_file()},
        gallery=build_gallery(predictions, data, metrics["split"], model, sidecar),
        versions=versions(), generated=utc_now(), audit=_audit(out_dir, sidecar))
    path = out_dir / REPORT_FILE
    atomic_write_bytes(path, render(inputs).encode("utf-8"))
    return path


def _audit(out_dir: Path, sidecar: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's audit.json (``dermcam audit``) with its images when it audits this checkpoint; a
    damaged one becomes a note in its section rather than a failed report."""
    from dermcam.audit.run import read_audit

    try:
        found = read_audit(out_dir)
    except DermcamError as exc:
        return {"error": str(exc)}
    if found is None or (found.get("checkpoint") or {}).get("id") != sidecar.get("id"):
        return None
    return found


def refresh_report(out_dir: Path, ref: str | Path | None = None, *, root: Path | None = None) -> Path | None:
    """Rewrite ``out_dir/report.html`` when the folder holds checkpoint ``ref``'s evaluation (after an
    audit wrote into it, so the page shows it now); None, writing nothing, when it holds none or
    another checkpoint's."""
    from dermcam.store.inference import load_for_inference

    try:
        metrics = _read_metrics(Path(out_dir))
    except DermcamError:
        return None
    model, sidecar = load_for_inference(ref, root)
    if metrics.get("checkpoint") != sidecar["id"]:
        return None
    return _write(Path(out_dir), model, sidecar, root)


def _read_metrics(out_dir: Path) -> dict[str, Any]:
    if not (out_dir / "metrics.json").is_file() or not (out_dir / "predictions.csv").is_file():
        raise NotFoundError(f"{out_dir} holds no evaluation (metrics.json and predictions.csv); "
                            f"write one with: dermcam evaluate --out {out_dir}")
    try:
        return dict(read_json(out_dir / "metrics.json"))
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(f"{out_dir / 'metrics.json'} cannot be read ({exc}); evaluate again") from None


def _manifest(name: str | None, root: Path | None) -> dict[str, Any] | None:
    """The manifest of prepared set ``name``, or None when this store does not have it (an exported
    model trained elsewhere)."""
    from dermcam.data.dataset import list_prepared

    return next((m for m in list_prepared(root) if m["name"] == name), None) if name else None


@dataclass
class ReportResult:
    """What ``dermcam report`` did: the page, and whether it had to evaluate again to write it."""

    path: Path
    checkpoint_id: str
    dataset: str
    split: str
    evaluated: bool
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"report": str(self.path), "checkpoint": self.checkpoint_id, "dataset": self.dataset,
                "split": self.split, "evaluated": self.evaluated, "files": [str(p) for p in self.files],
                "warnings": self.warnings}


def report(ref: str | Path | None = None, *, dataset: str | None = None, split: str = "test",
           out_dir: Path | None = None, reevaluate: bool = False, device: str = "auto", root: Path | None = None,
           progress: Progress | None = None) -> ReportResult:
    """Regenerate the report of a run's best checkpoint or of any checkpoint (``ref``: a run id, ``RUN:EPOCH``,
    ``best``, a path, an exported file) on ``split`` of its data set or of ``dataset``.

    ``out_dir`` defaults to the run's ``report/`` folder when ``ref`` is the checkpoint the run's report
    is about (its best, on its own test split), else ``./dermcam-report``. The checkpoint is evaluated
    again (``evaluate --out``) unless the folder already holds its current evaluation: same checkpoint,
    data set and split, calibrated without TTA, written after the checkpoint's sidecar (``calibrate``
    rewrites it) and the data set were; ``reevaluate`` always evaluates. A store checkpoint's training
    curves are drawn from its run's ``metrics.jsonl``.
    """
    from dermcam.evaluate.evaluation import evaluate
    from dermcam.evaluate.report import plot_curves
    from dermcam.store.ensembles import ensemble_name, manifest_path
    from dermcam.store.exported import is_exported_file
    from dermcam.store.inference import load_for_inference
    from dermcam.store.references import find_checkpoint
    from dermcam.store.runs import read_metrics, read_run

    ensemble = ensemble_name(ref, root)
    found = None if ensemble is not None or (ref is not None and is_exported_file(ref)) else find_checkpoint(ref, root)
    ckpt = found.checkpoint if found else None
    model, sidecar = load_for_inference(ckpt.sidecar_path if ckpt else ref, root)
    name = dataset or (sidecar.get("dataset") or {}).get("name")
    if out_dir is None:
        own = ckpt is not None and split == "test" and name == (sidecar.get("dataset") or {}).get("name")
        out_dir = ckpt.run_dir / "report" if own and read_run(ckpt.run_dir).get("best") == ckpt.id else DEFAULT_OUT
    out_dir = check_output_dir(out_dir, "--out")  # the default too: ./dermcam-report may be a file
    sources = [ckpt.sidecar_path if ckpt else manifest_path(ensemble, root) if ensemble else Path(str(ref))]
    evaluated = reevaluate or not _is_current(out_dir, sidecar, name, split, sources, root)
    warnings = found.warnings if found else []  # damaged checkpoints 'best' passed over
    if evaluated:
        result = evaluate(ckpt.sidecar_path if ckpt else ref, split=split, dataset=dataset, device=device,
                          out_dir=out_dir, root=root, progress=progress)
        warnings, name = warnings + result.warnings, result.dataset
    history = read_metrics(ckpt.run_dir) if ckpt else []
    if history:
        plot_curves(history, out_dir / "curves.png", title=f"run {ckpt.run_id}")
    path = _write(out_dir, model, sidecar, root)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return ReportResult(path, sidecar["id"], str(name), split, evaluated, files, warnings)


def _is_current(out_dir: Path, sidecar: dict[str, Any], dataset: str | None, split: str, sources: list[Path],
                root: Path | None) -> bool:
    """Whether ``out_dir`` holds this checkpoint's evaluation as it would be written now (see :func:`report`)."""
    from dermcam.data.dataset import load_prepared

    try:
        saved = _read_metrics(out_dir)
        data = load_prepared(dataset, root)
    except DermcamError:
        return False
    calibration = saved.get("calibration") or {}
    # On another set than the training set, the evaluation must have checked the overlap as evaluate does by
    # default: an older folder (no check) or one with --keep-overlap / another threshold is evaluated again.
    overlap = saved.get("overlap")
    default_overlap = (overlap is None and saved.get("dataset") == saved.get("trained_on")) or (
        isinstance(overlap, dict) and not overlap.get("kept") and overlap.get("threshold") == OVERLAP_THRESHOLD)
    newer = all((out_dir / "metrics.json").stat().st_mtime >= p.stat().st_mtime
                for p in [*sources, data.path / "manifest.json"])
    return (newer and saved.get("checkpoint") == sidecar["id"] and saved.get("dataset") == data.name
            and saved.get("split") == split and saved.get("tta") is False
            and calibration.get("applied") == bool(sidecar.get("calibration")) and default_overlap)
