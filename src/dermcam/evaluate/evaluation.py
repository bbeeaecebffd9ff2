"""Evaluating a checkpoint on a split of a prepared data set: metrics and report files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError
from dermcam.evaluate.predict import predict
from dermcam.models.device import resolve_precision
from dermcam.progress import Progress


@dataclass
class EvalResult:
    checkpoint_id: str
    dataset: str
    split: str
    metrics: dict[str, Any]
    classes: list[str]
    report_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``dermcam evaluate --json`` prints)."""
        return {"checkpoint": self.checkpoint_id, "dataset": self.dataset, "split": self.split,
                "metrics": self.metrics, "files": [str(p) for p in self.files], "warnings": self.warnings}


def evaluate(ref: str | Path | None = None, *, split: str = "test", dataset: str | None = None,
             tta: bool = False, device: str = "auto", precision: str = "auto", batch_size: int = 64,
             out_dir: Path | None = None, root: Path | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split of its data set (or of ``dataset``) and write a report."""
    from dermcam.data.dataset import load_prepared
    from dermcam.evaluate.metrics import compute_metrics
    from dermcam.evaluate.report import write_predictions, write_report
    from dermcam.models.device import select_device
    from dermcam.store.inference import load_for_inference

    if split not in ("train", "val", "test"):
        raise BadInputError(f"--split must be train, val or test, not '{split}'")
    model, sidecar = load_for_inference(ref, root)
    data = load_prepared(dataset or sidecar.get("dataset", {}).get("name"), root)
    warnings = []
    if list(data.classes) != list(sidecar["classes"]):
        raise BadInputError(f"data set '{data.name}' has classes {data.classes} but checkpoint "
                            f"{sidecar['id']} was trained on {sidecar['classes']}")
    trained_on = sidecar.get("dataset", {}).get("fingerprint")
    if trained_on and trained_on != data.fingerprint:
        warnings.append(f"data set '{data.name}' changed since checkpoint {sidecar['id']} was trained "
                        "(fingerprints differ): its splits may overlap the training data")
    dev = select_device(device)
    prec = resolve_precision(precision, dev, scoring=True)
    model.to(dev)
    rows, labels = data.split(split)
    pre = sidecar["preprocessing"]
    probs = predict(model, data.images, rows, preprocessing=pre, device=dev, precision=prec, batch_size=batch_size,
                    tta=tta, progress=progress, description=f"evaluate {split}")
    metrics = compute_metrics(labels, probs, sidecar["classes"])
    metrics["tta"] = tta
    report_dir = out_dir
    files: list[Path] = []
    if report_dir is not None:
        files = write_report(report_dir, metrics, sidecar["classes"], title=f"{sidecar['id']} on {data.name}/{split}")
        files.append(write_predictions(report_dir / "predictions.csv", data.index.iloc[rows], probs,
                                       list(sidecar["classes"])))
    return EvalResult(sidecar["id"], data.name, split, metrics, list(sidecar["classes"]), report_dir, files, warnings)
