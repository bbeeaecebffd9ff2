"""Colour constancy (``--color-constancy shades-of-gray``): the formula, and one answer per image on
every path that makes a model input (training batches, evaluate, explain, serve, ensembles, ONNX)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_json
from dermcam.cli import app
from dermcam.color import COLOR_CONSTANCY_METHODS, EPS, apply_color_constancy, shades_of_gray

SOG = "shades-of-gray"
TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "1"]
REDDISH = torch.tensor([1.0, 0.72, 0.5]).view(1, 3, 1, 1)  # a warm illuminant: red strong, blue weak
CACHE = [64, 48]  # width, height
PRE = {"input_size": [3, 40, 56], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
       "interpolation": "bilinear", "cache_size": CACHE}


def grey_card(batch: int = 2, height: int = 24, width: int = 32) -> torch.Tensor:
    """Grey surfaces of several brightnesses (equal in R, G and B), (B, 3, H, W) in [0, 0.9]."""
    torch.manual_seed(0)
    level = torch.rand(batch, 1, height, width) * 0.9
    return level.expand(batch, 3, height, width).contiguous()


# ------------------------------------------------------------------------------------------ the formula


def test_a_grey_card_under_a_reddish_light_comes_back_grey() -> None:
    tinted = grey_card() * REDDISH
    assert (tinted[:, 0] - tinted[:, 2]).abs().max() > 0.3  # visibly red before
    out = shades_of_gray(tinted)
    assert out.dtype == torch.float32 and out.shape == tinted.shape
    assert (out[:, 0] - out[:, 1]).abs().max() < 1e-5 and (out[:, 0] - out[:, 2]).abs().max() < 1e-5
    # The illuminant's mean brightness is kept: grey level x mean(REDDISH), not a stretched image.
    assert torch.allclose(out[:, 0], grey_card()[:, 0] * REDDISH.mean(), atol=1e-5)


def test_a_grey_image_is_unchanged_and_images_are_corrected_one_by_one() -> None:
    grey = grey_card()
    assert torch.allclose(shades_of_gray(grey), grey, atol=1e-6)
    mixed = torch.cat([grey[:1], grey[1:] * REDDISH])
    out = shades_of_gray(mixed)
    assert torch.allclose(out[:1], grey[:1], atol=1e-6)  # the tinted neighbour changes nothing
    assert torch.allclose(out[1:], shades_of_gray(mixed[1:]), atol=1e-7)


@pytest.mark.parametrize("colour", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.2, 0.0, 0.7),
                                    (EPS / 10, 0.5, 0.5)], ids=["black", "white", "red", "no-green", "tiny-red"])
def test_black_and_constant_images_give_no_nan_or_inf(colour: tuple[float, float, float]) -> None:
    x = torch.tensor(colour).view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    out = shades_of_gray(x)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if max(colour) == 0:
        assert (out == 0).all()  # black stays black


def test_none_is_the_identity_and_an_unknown_method_is_one_line() -> None:
    from dermcam.errors import BadInputError

    x = grey_card() * REDDISH
    assert apply_color_constancy(x, "none") is x
    assert COLOR_CONSTANCY_METHODS == ("none", SOG)
    with pytest.raises(BadInputError, match="--color-constancy 'grey-world' must be one of none, shades-of-gray"):
        apply_color_constancy(x, "grey-world")


def test_batch_input_applies_it_at_the_cache_size_before_the_resize() -> None:
    from dermcam.data.geometry import batch_input, normalize, resize, to_float

    pixels = (grey_card(2, 48, 64) * REDDISH * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with_sog = batch_input(pixels, {**PRE, "color_constancy": SOG})
    by_hand = normalize(resize(shades_of_gray(to_float(pixels)), (40, 56)), PRE["mean"], PRE["std"])
    assert torch.equal(with_sog, by_hand)
    # A sidecar without the key (an older checkpoint) and "none" are the same, bit for bit.
    assert torch.equal(batch_input(pixels, PRE), batch_input(pixels, {**PRE, "color_constancy": "none"}))
    assert (with_sog - batch_input(pixels, PRE)).abs().max() > 0.1


# ------------------------------------------------------------------------------- training's batches


def test_training_batches_see_what_evaluate_sees_on_both_pipeline_paths(tmp_path: Path) -> None:
    from dermcam.data.geometry import batch_input
    from dermcam.train.pipeline import BatchPipeline

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (10, 48, 64, 3)) * np.array([1.0, 0.7, 0.4])).astype(np.uint8)
    rows, labels, order = np.arange(10), np.zeros(10, dtype=np.int64), np.arange(10)
    pre = {**PRE, "color_constancy": SOG}

    def pipe(augment: bool, on_device: bool) -> BatchPipeline:
        return BatchPipeline(images, rows, labels, batch_size=5, preprocessing=pre, augment=augment, seed=1,
                             device=torch.device("cpu"), channels_last=False, on_device=on_device)

    x, _, _ = pipe(False, False).cpu_batch(order, 0, 1)
    assert torch.equal(x, batch_input(images[5:10], pre))  # validation's view of the same rows
    for augment in (False, True):
        cpu, _, _ = pipe(augment, False).batch(order, 2, 0)
        device, _, _ = pipe(augment, True).batch(order, 2, 0)
        assert torch.allclose(cpu, device, atol=1e-5)


# ------------------------------------------------------------------------------ one answer everywhere


def tinted_pixels(tmp_path: Path) -> np.ndarray:
    """Three synthetic dermoscopy photos under a warm light, decoded at the cache size (N, 48, 64, 3)."""
    from dermcam.data.images import decode_image
    from dermcam.data.synthetic import write_synthetic_ham10000

    folder = write_synthetic_ham10000(tmp_path / "photos", n_lesions_per_class=1, images_per_lesion=(1, 1),
                                      size=(200, 150), seed=5)
    photos = sorted(folder.rglob("*.jpg"))[:3]
    pixels = np.stack([decode_image(p, tuple(CACHE))[0] for p in photos]).astype(np.float64)
    return np.clip(np.round(pixels * np.array([1.0, 0.75, 0.55])), 0, 255).astype(np.uint8)


def sog_checkpoint(run_id: str = "c0c001") -> str:
    """A tiny test_efficientnet with colour constancy, a 64x48 cache, a 56x40 input and a temperature;
    its head scaled up so that a wrong colour (or resize, or calibration) moves the probabilities."""
    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run
    from test_ckpt import model_state, sidecar

    state = dict(model_state())
    state["classifier.weight"] = state["classifier.weight"] * 40
    side = sidecar(0.8)
    side["preprocessing"] = {**PRE, "color_constancy": SOG}
    side["calibration"] = {"method": "temperature", "temperature": 1.6}
    run_dir = create_run({"backbone": side["backbone"]}, run_id=run_id)
    return save_checkpoint(run_dir, epoch=0, model_state=state, sidecar=side).id


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_evaluate_explain_serve_and_onnx_give_the_same_probabilities(runner, tmp_path: Path) -> None:
    import onnxruntime

    from dermcam.data.geometry import model_input
    from dermcam.evaluate.operating import model_outputs
    from dermcam.evaluate.predict import predict
    from dermcam.serve.model import ServedModel, read_upload
    from dermcam.store.inference import load_for_inference
    from test_ckpt import invoke

    ref = sog_checkpoint()
    model, side = load_for_inference(ref)
    assert side["preprocessing"]["color_constancy"] == SOG
    uploads = [read_upload(f"p{i}.png", png_bytes(p), side["preprocessing"])
               for i, p in enumerate(tinted_pixels(tmp_path))]
    pixels = np.stack([u.pixels for u in uploads])

    raw = predict(model, pixels, np.arange(len(pixels)), preprocessing=side["preprocessing"], device="cpu")
    evaluated = model_outputs(raw, side).probs
    with torch.no_grad():
        logits = model(torch.stack([model_input(p, side["preprocessing"]) for p in pixels]))
    explained = model_outputs(logits.softmax(1).numpy(), side).probs
    served = ServedModel.load(ref, device="cpu").predict(uploads)
    served_probs = np.array([[a.probabilities[c] for c in side["classes"]] for a in served])

    out = tmp_path / "model.onnx"
    exported = invoke(runner, "export", ref, "--format", "onnx", "-o", str(out), "--json")
    assert exported.exit_code == 0, exported.output
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _, onnx_probs = session.run(None, {"image": pixels})
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dermcam"])
    assert meta["preprocessing"]["color_constancy"] == SOG
    assert "colour constancy (shades-of-gray)" in meta["graph"]["input"]["content"]

    assert np.abs(explained - evaluated).max() < 1e-5
    assert np.abs(served_probs - evaluated).max() < 2e-6  # the API rounds to 6 places
    assert np.abs(onnx_probs - evaluated).max() < 1e-4
    # ... and the setting matters: the same model without it answers visibly differently.
    without = model_outputs(predict(model, pixels, np.arange(len(pixels)), preprocessing=PRE, device="cpu"), side)
    assert np.abs(without.probs - evaluated).max() > 1e-2


def test_each_ensemble_member_applies_its_own_setting(tmp_path: Path) -> None:
    import timm

    from dermcam.data.geometry import batch_input, to_float
    from dermcam.deploy.onnx_export import MatrixResizedEnsemble
    from dermcam.models.ensemble import EnsembleModel, MemberSpec

    torch.manual_seed(2)
    nets = [timm.create_model("test_efficientnet", num_classes=3).eval() for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            net.get_classifier().weight.mul_(40)
    pres = [{**PRE, "color_constancy": SOG}, {**PRE, "input_size": [3, 32, 48]}]  # the second: none (old)
    ensemble = EnsembleModel(nets, [MemberSpec(p, None, 1.0) for p in pres]).eval()
    pixels = tinted_pixels(tmp_path)
    with torch.no_grad():
        alone = [net(batch_input(pixels, p)).softmax(1) for net, p in zip(nets, pres)]
        together = ensemble(to_float(pixels)).exp()
        matrices = MatrixResizedEnsemble(ensemble, tuple(CACHE))(to_float(pixels)).exp()
    assert torch.allclose(together, (alone[0] + alone[1]) / 2, atol=1e-5)
    assert torch.allclose(matrices, together, atol=1e-4)


# ----------------------------------------------------------------------------------------- the CLI


def test_train_records_the_setting(runner, home: Path) -> None:
    """(tests/test_train.py checks that a run without the option records "none".)"""
    [sog] = run_json(runner, ["train", *TINY, "--color-constancy", SOG, "--json"])
    sidecar = json.loads((Path(sog["run_dir"]) / "epoch-0000.json").read_text())
    assert sidecar["preprocessing"]["color_constancy"] == SOG and sidecar["config"]["color_constancy"] == SOG
    evaluated = run_json(runner, ["evaluate", f"{sog['run_id']}:0", "--resamples", "0", "--json"])
    assert 0.0 <= evaluated["metrics"]["balanced_accuracy"] <= 1.0


@pytest.mark.parametrize("value", ["grey-world", "Shades-Of-Gray", ""])
def test_a_bad_value_is_exit_2_in_one_line(runner, home: Path, value: str) -> None:
    result = runner.invoke(app, ["train", *TINY, "--color-constancy", value])
    assert result.exit_code == 2, result.output
    assert "--color-constancy" in result.stderr and result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.output
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())  # refused before any work


def test_the_option_is_in_the_help(runner) -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--color-constancy" in result.output and "shades-of-gray" in result.output
    assert "default: none" in result.output


def test_a_sidecar_with_an_unknown_method_is_damaged(runner, tmp_path: Path) -> None:
    from dermcam.errors import CorruptError
    from dermcam.store.inference import load_for_inference
    from dermcam.store.references import resolve

    ref = sog_checkpoint("c0c002")
    path = resolve(ref).sidecar_path
    doc = json.loads(path.read_text())
    doc["preprocessing"]["color_constancy"] = "grey-world"
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptError, match="color_constancy"):
        load_for_inference(ref)
    verify = runner.invoke(app, ["ckpt", "verify"])
    assert verify.exit_code == 4, verify.output
