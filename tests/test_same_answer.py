"""One truth per image: ``evaluate`` (through the prepared cache) and ``explain`` (straight from the
file) give the same probabilities for the same file, whatever its shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcam.cli import app

INPUT = [3, 48, 64]  # the model sees 64x48: smaller than the 256x192 cache, as in real use
SHARPEN = 40.0  # a random head gives near-uniform probabilities; scaled up, small input changes show
SHAPES = {"4:3": None, "square": (180, 180), "600x450": (600, 450)}


@pytest.fixture
def mixed_source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A HAM10000-layout folder whose images come in three shapes; returns it and image_id -> shape."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(tmp_path / "src", n_lesions_per_class=4, images_per_lesion=(1, 1),
                                   size=(200, 150), seed=3)
    shapes = {}
    for i, path in enumerate(sorted(src.glob("HAM10000_images_part_*/*.jpg"))):
        shape = list(SHAPES)[i % 3]
        if SHAPES[shape] is not None:
            with Image.open(path) as image:
                image.convert("RGB").resize(SHAPES[shape], Image.Resampling.BICUBIC).save(path, quality=92)
        shapes[path.stem] = shape
    return src, shapes


def _model(num_classes: int, sharpen: float = SHARPEN):
    import timm
    import torch

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", num_classes=num_classes).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(sharpen)
    return model


def saved_checkpoint(dataset: dict, *, sharpen: float = SHARPEN, run_id: str = "5a3e00",
                     input_size: list[int] = INPUT) -> str:
    """A random test_efficientnet (classifier weights times ``sharpen``: over-confident) saved as
    training would save it for ``dataset`` (a manifest), without a calibration: an old checkpoint."""
    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    classes = dataset["classes"]
    model = _model(len(classes), sharpen)
    sidecar = {"backbone": "test_efficientnet", "classes": classes,
               "preprocessing": {"input_size": input_size, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
                                 "cache_size": [dataset["cache"]["width"], dataset["cache"]["height"]]},
               "dataset": {"name": dataset["name"], "fingerprint": dataset["fingerprint"]},
               "metrics": {"balanced_accuracy": 0.5},
               "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.5}}
    return save_checkpoint(create_run({}, run_id=run_id), epoch=0, model_state=model.state_dict(),
                           sidecar=sidecar).id


def _threshold_class(manifest: dict) -> str | None:
    """A class the val split has some but not all images of (an operating point needs both)."""
    counts = manifest["counts"]["val"]
    return next((c for c, n in counts.items() if 0 < n < sum(counts.values())), None)


@pytest.mark.parametrize("calibrated", [False, True], ids=["raw", "calibrated"])
def test_evaluate_and_explain_agree_on_every_image(runner, mixed_source, tmp_path: Path, calibrated: bool) -> None:
    src, shapes = mixed_source
    prepared = runner.invoke(app, ["prepare", str(src), "--name", "geo", "--json"])
    assert prepared.exit_code == 0, prepared.output
    manifest = json.loads(prepared.stdout)["manifest"]
    ckpt = saved_checkpoint(manifest)
    point_class = _threshold_class(manifest)
    if calibrated:  # through calibrate.apply in both commands, with an operating point where val allows one
        extra = ["--operating-point", f"{point_class}:sensitivity=0.5"] if point_class else []
        fitted = runner.invoke(app, ["calibrate", ckpt, *extra, "--json"])
        assert fitted.exit_code == 0, fitted.output
        assert json.loads(fitted.stdout)["calibration"]["temperature"] > 1  # the sharpened model is over-confident

    by_evaluate: dict[str, np.ndarray] = {}
    decided: dict[str, str] = {}
    for split in ("train", "val", "test"):
        result = runner.invoke(app, ["evaluate", ckpt, "--split", split, "--out", str(tmp_path / split)])
        assert result.exit_code == 0, result.output
        with open(tmp_path / split / "predictions.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                by_evaluate[row["image_id"]] = np.array([float(row[f"p_{c}"]) for c in ("bkl", "mel", "nv")])
                decided[row["image_id"]] = row.get("decision") or row["predicted"]

    explained = runner.invoke(app, ["explain", str(src), "--recursive", "-c", ckpt, "--no-cam", "--json",
                                    "-o", str(tmp_path / "explain")])
    assert explained.exit_code == 0, explained.output
    report = json.loads(explained.stdout)
    assert (report["calibration"] is not None) == calibrated
    by_explain = {Path(r["image"]).stem: np.array([r["probabilities"][c] for c in ("bkl", "mel", "nv")])
                  for r in report["images"]}

    assert set(by_explain) == set(by_evaluate) == set(shapes)
    for shape in SHAPES:
        ids = [i for i, s in shapes.items() if s == shape]
        gap = max(np.abs(by_evaluate[i] - by_explain[i]).max() for i in ids)
        assert gap < 1e-3, f"{shape}: evaluate and explain differ by {gap:.4f}"
    point = report["operating_point"]
    for r in report["images"]:  # the same decision, except within the 1e-3 tolerance of the threshold
        image_id = Path(r["image"]).stem
        if point is None or abs(r["probabilities"][point["class"]] - point["threshold"]) > 1e-3:
            assert r["decision"] == decided[image_id], image_id


def test_the_check_would_catch_a_squashed_image(mixed_source) -> None:
    """The agreement above is not trivially true: squashing a square photo instead of cropping it
    (what explain used to do) moves this model's probabilities by far more than the tolerance."""
    import torch

    from dermcam.data.geometry import batch_input, model_input
    from dermcam.data.images import decode_image

    src, shapes = mixed_source
    model = _model(3)
    pre = {"input_size": INPUT, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    gaps = []
    for image_id in (i for i, s in shapes.items() if s == "square"):
        path = next(src.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        cropped = model_input(decode_image(path, (256, 192))[0], pre)
        with Image.open(path) as photo:
            squashed = batch_input(np.array(photo.convert("RGB"))[None], pre)[0]
        with torch.no_grad():
            probs = model(torch.stack([cropped, squashed])).softmax(1)
        gaps.append(float((probs[0] - probs[1]).abs().max()))
    assert max(gaps) > 1e-2
