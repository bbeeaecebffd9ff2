"""dermcam explain, through the CLI, with a tiny random timm checkpoint in a temporary store."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcam.cli import app

CLASSES = ["nv", "bkl", "mel"]
INPUT = 64  # test_efficientnet has stride 32: a 2x2 feature map, so the CAM is not constant


@pytest.fixture
def checkpoint(dermcam_home: Path) -> dict:
    """A store checkpoint of a random test_efficientnet (what training would have written)."""
    import timm
    import torch

    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    run = create_run({"backbone": "test_efficientnet"}, run_id="c0ffee")
    sidecar = {"backbone": "test_efficientnet", "classes": CLASSES,
               "preprocessing": {"input_size": [3, INPUT, INPUT], "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"},
               "metrics": {"balanced_accuracy": 0.5},
               "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.5}}
    return save_checkpoint(run, epoch=0, model_state=model.state_dict(), sidecar=sidecar).sidecar


def _photo(path: Path, size: tuple[int, int] = (90, 60), mode: str = "RGB", seed: int = 0, **save) -> Path:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(
        rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def run(runner, *args: str):
    return runner.invoke(app, ["explain", *args], env={"COLUMNS": "200"})


def _sidecar(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_explains_images_with_overlays_at_their_own_size_and_sidecars(runner, checkpoint, tmp_path) -> None:
    a = _photo(tmp_path / "in" / "lesion_a.jpg", (90, 60))
    b = _photo(tmp_path / "in" / "lesion_b.png", (50, 70), mode="RGBA", seed=1)
    out = tmp_path / "out"
    result = run(runner, str(a), str(b), "-o", str(out))
    assert result.exit_code == 0, result.output
    for name in ("lesion_a", "lesion_b", "p(nv)", "p(bkl)", "p(mel)", "c0ffee:0", "gradcam on bn2"):
        assert name in result.stdout
    with Image.open(out / "lesion_a.cam.png") as overlay:
        assert overlay.size == (90, 60) and overlay.format == "PNG"
    with Image.open(out / "lesion_b.cam.png") as overlay:
        assert overlay.size == (50, 70)
    meta = _sidecar(out, "lesion_a")
    assert meta["checkpoint"] == {"id": "c0ffee:0", "sha256": checkpoint["weights"]["sha256"],
                                  "backbone": "test_efficientnet"}
    assert meta["method"] == "gradcam" and meta["target_layer"] == "bn2" and meta["tta"] is False
    assert meta["input_size"] == [3, INPUT, INPUT] and meta["image_size"] == [90, 60]
    assert meta["overlay"] == "lesion_a.cam.png" and meta["dermcam_version"]
    assert sum(meta["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert meta["predicted"] == max(meta["probabilities"], key=meta["probabilities"].get) == meta["target_class"]


def test_saved_map_is_the_library_cam_of_the_preprocessed_image(runner, checkpoint, tmp_path) -> None:
    from dermcam.data.geometry import cache_size, model_input
    from dermcam.data.images import decode_image
    from dermcam.explain.methods import compute_cam
    from dermcam.store.inference import load_for_inference

    image = _photo(tmp_path / "x.jpg", (120, 80))
    out = tmp_path / "out"
    assert run(runner, str(image), "-o", str(out), "--npy", "--method", "gradcam++").exit_code == 0
    saved = np.load(out / "x.cam.npy", allow_pickle=False)
    model, sidecar = load_for_inference("c0ffee:0")
    pixels, _ = decode_image(image, cache_size(sidecar["preprocessing"]))
    x = model_input(pixels, sidecar["preprocessing"])[None]
    expected = compute_cam(model, x, "gradcam++")
    assert saved.shape == (INPUT, INPUT) and saved.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(saved, expected.maps[0], atol=1e-5)
    meta = _sidecar(out, "x")
    np.testing.assert_allclose(list(meta["probabilities"].values()), expected.probs[0], atol=1e-5)
    assert meta["npy"] == "x.cam.npy" and meta["method"] == "gradcam++"


def test_bad_files_are_reported_one_line_each_and_the_batch_goes_on(runner, checkpoint, tmp_path) -> None:
    folder = tmp_path / "in"
    good = _photo(folder / "good.jpg")
    (folder / "text.jpg").write_text("this is not a picture")
    truncated = _photo(tmp_path / "full.jpg", (200, 150)).read_bytes()
    (folder / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    result = run(runner, str(folder), str(tmp_path / "missing.jpg"), "-o", str(out), "--csv", str(tmp_path / "r.csv"))
    assert result.exit_code == 5, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 4
    for name in ("text.jpg", "truncated.jpg", "empty.png", "missing.jpg"):
        assert sum(name in line for line in errors) == 1
    assert "truncated" in next(line for line in errors if "truncated.jpg" in line)
    assert "Traceback" not in result.output
    assert (out / "good.cam.png").exists() and not (out / "text.cam.png").exists()
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert {r["image"]: r["status"] for r in rows} == {
        str(good): "ok", str(folder / "text.jpg"): "error", str(folder / "truncated.jpg"): "error",
        str(folder / "empty.png"): "error", str(tmp_path / "missing.jpg"): "error"}
    ok = next(r for r in rows if r["status"] == "ok")
    assert set(ok) >= {"p_nv", "p_bkl", "p_mel", "predicted", "overlay"} and float(ok["p_mel"]) > 0


def test_nothing_usable_exits_2(runner, checkpoint, tmp_path) -> None:
    (tmp_path / "junk.png").write_text("junk")
    result = run(runner, str(tmp_path / "junk.png"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "junk.png: not an image" in result.stderr


def test_decompression_bombs_are_refused(runner, checkpoint, tmp_path, monkeypatch) -> None:
    import dermcam.data.images

    big = _photo(tmp_path / "big.png", (400, 300))
    small = _photo(tmp_path / "small.png", (40, 30))
    monkeypatch.setattr(dermcam.data.images, "MAX_IMAGE_PIXELS", 100_000)  # our own limit, checked before decoding
    result = run(runner, str(big), str(small), "-o", str(tmp_path / "out"))
    assert result.exit_code == 5 and "big.png: 400x300 pixels is over" in result.stderr
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow's own check (error at 2x) is caught too
    result = run(runner, str(big), str(small), "-o", str(tmp_path / "out"))
    assert result.exit_code == 5 and "big.png: refused as a possible decompression bomb" in result.stderr


@pytest.mark.parametrize(("mode", "suffix"), [("L", ".png"), ("I;16", ".png"), ("CMYK", ".jpg"), ("P", ".gif"),
                                              ("LA", ".png"), ("1", ".bmp"), ("RGB", ".webp"), ("RGB", ".tiff")])
def test_exotic_modes_and_formats_work(runner, checkpoint, tmp_path, mode: str, suffix: str) -> None:
    image = _photo(tmp_path / f"img{suffix}", (48, 40), mode=mode)
    out = tmp_path / "out"
    result = run(runner, str(image), "-o", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out / "img.cam.png") as overlay:
        assert overlay.size == (48, 40) and overlay.mode == "RGB"


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    from dermcam.data.images import decode_image, to_rgb

    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(grey))[0, 0].tolist() == [128, 128, 128]
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    cached, note = decode_image(buffer.getvalue(), (4, 4))  # prepare's path gives the same pixels
    assert cached[0, 0].tolist() == [128, 128, 128] and note == "16-bit grayscale converted to 8-bit RGB"


def test_exif_orientation_is_applied(runner, checkpoint, tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image = _photo(tmp_path / "phone.jpg", (80, 40), exif=exif.tobytes())
    out = tmp_path / "out"
    assert run(runner, str(image), "-o", str(out)).exit_code == 0
    with Image.open(out / "phone.cam.png") as overlay:
        assert overlay.size == (40, 80)


def test_target_class_by_name_or_index_and_unknown_class(runner, checkpoint, tmp_path) -> None:
    image = _photo(tmp_path / "x.jpg")
    out = tmp_path / "out"
    assert run(runner, str(image), "-o", str(out), "--target", "bkl").exit_code == 0
    assert _sidecar(out, "x")["target_class"] == "bkl"
    assert run(runner, str(image), "-o", str(out), "--target", "2").exit_code == 0
    assert _sidecar(out, "x")["target_class"] == "mel"
    result = run(runner, str(image), "-o", str(out), "--target", "bcc")
    assert result.exit_code == 2 and "unknown target class 'bcc'; this model's classes are nv, bkl, mel" in result.stderr


def test_layer_option_and_a_clear_error_for_an_unknown_layer(runner, checkpoint, tmp_path) -> None:
    image = _photo(tmp_path / "x.jpg")
    out = tmp_path / "out"
    assert run(runner, str(image), "-o", str(out), "--layer", "blocks.4").exit_code == 0
    assert _sidecar(out, "x")["target_layer"] == "blocks.4"
    result = run(runner, str(image), "-o", str(out), "--layer", "blocks.9")
    assert result.exit_code == 2
    assert "layer 'blocks.9' not found in EfficientNet; did you mean" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("method", ["scorecam", "eigencam"])
def test_other_methods_and_tta(runner, checkpoint, tmp_path, method: str) -> None:
    image = _photo(tmp_path / "x.jpg")
    out = tmp_path / "out"
    assert run(runner, str(image), "-o", str(out), "--method", method, "--tta").exit_code == 0
    meta = _sidecar(out, "x")
    assert meta["method"] == method and meta["tta"] is True and (out / "x.cam.png").exists()


def test_unknown_method_is_a_usage_error(runner, checkpoint, tmp_path) -> None:
    import typer.main

    from dermcam.explain.methods import METHODS

    option = next(p for p in typer.main.get_command(app).commands["explain"].params if p.name == "method")
    assert option.metavar == "|".join(METHODS)  # --help lists the library's methods, not a copy
    result = run(runner, str(_photo(tmp_path / "x.jpg")), "--method", "lime", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "unknown CAM method 'lime'" in result.stderr


def test_no_cam_writes_predictions_only_and_score_needs_a_cam(runner, checkpoint, tmp_path) -> None:
    image = _photo(tmp_path / "x.jpg")
    out = tmp_path / "out"
    result = run(runner, str(image), "-o", str(out), "--no-cam", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] is None and report["images"][0]["overlay"] is None
    assert not (out / "x.cam.png").exists() and _sidecar(out, "x")["method"] is None
    result = run(runner, str(image), "-o", str(out), "--no-cam", "--score")
    assert result.exit_code == 2 and "--no-cam" in result.stderr


def test_score_adds_deletion_and_insertion_auc(runner, checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    result = run(runner, str(_photo(tmp_path / "x.jpg")), "-o", str(out), "--score", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["images"][0]["faithfulness"]
    assert scores == _sidecar(out, "x")["faithfulness"]
    assert 0 <= scores["deletion_auc"] <= 1 and 0 <= scores["insertion_auc"] <= 1


def test_the_table_fits_the_terminal_without_cutting_a_number(runner, checkpoint, tmp_path) -> None:
    """At 80 columns with --score, the scores are whole and the overlays move to the caption; at 200 the
    overlay column is back. Same names in two folders: the table shows paths, not two equal names."""
    photos = [_photo(tmp_path / "a" / "lesion_with_a_long_name.jpg", seed=1),
              _photo(tmp_path / "b" / "lesion_with_a_long_name.jpg", seed=2)]
    for columns, overlay_column in (("80", False), ("200", True)):
        result = runner.invoke(app, ["explain", *map(str, photos), "-o", str(tmp_path / f"out{columns}"),
                                     "--score"], env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert max(len(line.rstrip()) for line in lines) <= int(columns)
        header = next(line for line in lines if "predicted" in line)
        assert "del. AUC" in header and "ins. AUC" in header
        assert ("overlay" in header) is overlay_column and ("Overlays:" in result.stdout) is not overlay_column
        rows = [line for line in lines if re.search(r"\b0\.\d{3}\s+0\.\d{3}\s*$", line)]
        assert len(rows) == 2, result.stdout  # both scores whole at the end of each image's first line
        if overlay_column:
            assert "a/lesion_with_a_long_name.jpg" in result.stdout and "b/lesion_with_a_long_name.jpg" in result.stdout


def test_folders_recursion_and_name_collisions(runner, checkpoint, tmp_path) -> None:
    folder = tmp_path / "in"
    _photo(folder / "a.jpg")
    _photo(folder / "a.png")
    _photo(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    result = run(runner, str(folder), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.cam.png")) == ["a-2.cam.png", "a.cam.png"]
    assert not (out / "sub").exists()
    result = run(runner, str(folder), "-o", str(out), "-r")
    assert result.exit_code == 0 and (out / "sub" / "a.cam.png").exists()


def test_empty_folder_and_missing_checkpoint(runner, checkpoint, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(runner, str(tmp_path / "empty"))
    assert result.exit_code == 3 and "no images found" in result.stderr
    result = run(runner, str(_photo(tmp_path / "x.jpg")), "--checkpoint", "nope:3", "-o", str(tmp_path / "o"))
    assert result.exit_code == 3


def test_an_exported_file_works_as_checkpoint(runner, checkpoint, tmp_path) -> None:
    from dermcam.store.exchange import export_checkpoint

    exported = export_checkpoint("c0ffee:0", tmp_path / "model.safetensors")
    out = tmp_path / "out"
    result = run(runner, str(_photo(tmp_path / "x.jpg")), "--checkpoint", exported["file"], "-o", str(out))
    assert result.exit_code == 0, result.output
    assert _sidecar(out, "x")["checkpoint"]["sha256"] == exported["file_sha256"]


def test_explain_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom dermcam.cli import app\ntry:\n    app(['explain', '--help'], standalone_mode=False)\n"
            "except SystemExit:\n    pass\nprint('HEAVY=' + ','.join(m for m in ('torch', 'timm', 'torchvision') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("HEAVY="), out
