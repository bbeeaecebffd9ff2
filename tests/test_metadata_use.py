"""Patient metadata at inference: explain (a CSV), serve (form fields), report.html and the ONNX export.

The model is a tiny random test_efficientnet fused with a metadata network whose weights are made large,
so that an image's metadata visibly moves its answer: the tests can then tell "read the metadata" from
"answered as if nothing were known".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermcam.cli import app
from dermcam.data.metadata import encode, fit_spec
from dermcam.errors import BadInputError, NotFoundError
from test_explain_cli import CLASSES, INPUT, _photo

SITES = ["back", "face", "lower extremity"]


def one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    message = result.output.strip()
    assert message.startswith("Error:") and "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message


def spec_block() -> dict:
    rows = pd.DataFrame({"age": ["30", "50", "70", "45"], "sex": ["female", "male", "female", "male"],
                         "localization": SITES + ["back"]})
    return fit_spec("age,sex,site", rows).to_dict()


def fused_model(seed: int = 0) -> torch.nn.Module:
    """A fusion model whose answer the metadata moves a lot (large metadata-network and head weights)."""
    from dermcam.models.backbones import build_model

    torch.manual_seed(seed)
    model = build_model("test_efficientnet", len(CLASSES), spec_block()).eval()
    with torch.no_grad():
        for layer in (model.metadata[0], model.metadata[3]):
            layer.weight.mul_(3.0)
            layer.bias.normal_(0, 0.5)
        model.head.weight[:, model.num_features:].normal_(0, 0.3)
    return model


def save(model: torch.nn.Module, run_id: str = "beef00", epoch: int = 0, metadata: bool = True) -> str:
    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.paths import runs_dir
    from dermcam.store.runs import create_run

    run = runs_dir() / run_id
    if not run.exists():
        run = create_run({"backbone": "test_efficientnet"}, run_id=run_id)
    sidecar = {"backbone": "test_efficientnet", "classes": CLASSES,
               "preprocessing": {"input_size": [3, INPUT, INPUT], "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"},
               "metrics": {"balanced_accuracy": 0.5},
               "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.5},
               **({"metadata": spec_block()} if metadata else {})}
    save_checkpoint(run, epoch=epoch, model_state=model.state_dict(), sidecar=sidecar)
    return f"{run_id}:{epoch}"


@pytest.fixture
def fused(dermcam_home: Path) -> str:
    return save(fused_model())


@pytest.fixture
def plain(dermcam_home: Path) -> str:
    from dermcam.models.backbones import build_model

    torch.manual_seed(3)
    return save(build_model("test_efficientnet", len(CLASSES)), run_id="cafe00", metadata=False)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [_photo(tmp_path / "in" / f"lesion_{i}.jpg", (90, 60), seed=i) for i in range(3)]


def explain(runner, *args: str):
    return runner.invoke(app, ["explain", "--device", "cpu", "--json", *args], env={"COLUMNS": "200"})


def explained(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- reading a metadata CSV -------------------------------------------------------------------------------

def test_a_metadata_csv_is_read_as_prepare_reads_csvs(tmp_path: Path) -> None:
    from dermcam.data.metadata_input import read_metadata_csv

    path = tmp_path / "m.csv"
    # Excel's UTF-16 "Unicode text": tab-separated, with a BOM; ISIC's column names; ids without extension
    path.write_bytes("isic_id\tage_approx\tsex\tanatom_site_general\nlesion_0\t45\tMale\tBack\n"
                     "imgs/lesion_1.png\tabc\t\t\n".encode("utf-16"))
    table = read_metadata_csv(path)
    assert table.fields == ("age", "sex", "site")
    assert table.lookup(Path("x/lesion_0.jpg")) == {"age": "45", "sex": "Male", "localization": "Back"}
    assert table.lookup("lesion_1.PNG") == {"age": "abc", "sex": "", "localization": ""}
    assert table.lookup("lesion_9.jpg") is None
    assert any("1 age value" in n for n in table.notes)


@pytest.mark.parametrize("content, error, words", [
    (b"", BadInputError, "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", BadInputError, "not a CSV"),
    (b"name,age\na.jpg,40\n", BadInputError, "no image column"),
    (b"image,dx\na.jpg,mel\n", BadInputError, "none of the columns age, sex, site"),
    (b"image,age\na.jpg,40\na.jpg,41\n", BadInputError, "lines 2 and 3"),
])
def test_a_bad_metadata_csv_is_one_line(tmp_path: Path, content: bytes, error: type, words: str) -> None:
    from dermcam.data.metadata_input import read_metadata_csv

    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(error, match=words):
        read_metadata_csv(path)
    with pytest.raises(NotFoundError):
        read_metadata_csv(tmp_path / "missing.csv")


def test_a_stem_two_rows_share_is_refused_for_an_image_it_cannot_tell(tmp_path: Path) -> None:
    from dermcam.data.metadata_input import read_metadata_csv

    path = tmp_path / "m.csv"
    path.write_text("image,age\na.jpg,40\na.png,50\n")
    table = read_metadata_csv(path)
    assert table.lookup("a.png")["age"] == "50"
    with pytest.raises(BadInputError, match="lines 2, 3"):
        table.lookup("a.tif")


@pytest.mark.parametrize("values, words", [({"age": "abc"}, "age must be a number"), ({"age": "150"}, "0 to 120"),
                                           ({"age": "nan"}, "age"), ({"sex": "x"}, "sex must be"),
                                           ({"site": "a\nb"}, "site must be"), ({"site": "s" * 101}, "site")])
def test_form_values_are_checked(values: dict, words: str) -> None:
    from dermcam.data.metadata_input import form_row

    with pytest.raises(BadInputError, match=words):
        form_row(**values)
    assert form_row() is None and form_row(" ", "", "") is None
    assert form_row("40", "F", "Back") == {"age": "40", "sex": "female", "localization": "Back"}


# -- explain ----------------------------------------------------------------------------------------------

def test_explain_reads_the_csv_for_the_prediction_and_the_map(runner, fused, photos, tmp_path) -> None:
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age,sex,site\nlesion_0.jpg,80,male,face\nlesion_1,20,female,back\n")
    out_with, out_without = tmp_path / "with", tmp_path / "without"
    with_meta = explained(explain(runner, *map(str, photos), "-c", fused, "--metadata", str(csv), "-o",
                                  str(out_with), "--npy", "--score", "--csv", str(tmp_path / "rows.csv")))
    rows = pd.read_csv(tmp_path / "rows.csv", dtype=str, keep_default_na=False)
    assert rows["metadata"].tolist() == ["answered with age, sex, site"] * 2 + ["answered without metadata"]
    without = explained(explain(runner, *map(str, photos), "-c", fused, "-o", str(out_without), "--npy"))

    assert with_meta["metadata"] == {"fields": ["age", "sex", "site"], "files": [str(csv)], "images": 3,
                                     "without_metadata": 1}
    first, _, third = with_meta["images"]
    assert first["metadata"] == {"fields": ["age", "sex", "site"], "known": ["age", "sex", "site"],
                                 "answered": "answered with age, sex, site", "source": str(csv)}
    assert third["metadata"]["known"] == [] and third["metadata"]["answered"] == "answered without metadata"
    sidecar = json.loads((out_with / "lesion_1.json").read_text())
    assert sidecar["metadata"]["known"] == ["age", "sex", "site"] and sidecar["metadata"]["source"] == str(csv)
    assert first["faithfulness"] and third["faithfulness"]

    # without a CSV: every image answered without metadata, as the image with no row above
    assert without["metadata"]["without_metadata"] == 3 and without["metadata"]["files"] == []
    assert all(i["metadata"]["answered"] == "answered without metadata" for i in without["images"])
    assert third["probabilities"] == pytest.approx(without["images"][2]["probabilities"], abs=1e-5)
    changed = [a["probabilities"] != pytest.approx(b["probabilities"], abs=1e-3)
               for a, b in zip(with_meta["images"][:2], without["images"][:2])]
    assert all(changed)

    # the prediction and the map are the model's with the metadata: computed here by hand
    from dermcam.data.geometry import cache_size, model_input
    from dermcam.data.images import decode_image
    from dermcam.data.metadata_input import frame_of
    from dermcam.explain.methods import compute_cam
    from dermcam.metadata_spec import MetadataSpec
    from dermcam.store.inference import load_for_inference

    model, side = load_for_inference(fused)
    spec = MetadataSpec.from_dict(side["metadata"])
    pixels, _ = decode_image(photos[0], cache_size(side["preprocessing"]))
    x = model_input(pixels, side["preprocessing"])[None]
    meta = torch.from_numpy(encode(spec, frame_of([{"age": "80", "sex": "male", "localization": "face"}])))
    with torch.no_grad():
        probs = model(x, meta).softmax(1)[0].numpy()
    assert list(first["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)

    class Bound(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z):
            return self.inner(z, meta.expand(len(z), -1))

    expected = compute_cam(Bound(), x, "gradcam", target_layer="inner.backbone.bn2",
                           target=CLASSES.index(first["decision"])).maps[0]
    np.testing.assert_allclose(np.load(out_with / "lesion_0.cam.npy"), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["scorecam", "gradcam++"])
def test_maps_of_a_batch_with_mixed_metadata_are_each_images_own(runner, fused, photos, tmp_path, method) -> None:
    """ScoreCAM runs masked copies of one image, TTA flips the batch: each must read its image's row."""
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age,sex,site\nlesion_0.jpg,80,male,face\nlesion_1,20,female,back\n")
    common = ["-c", fused, "--metadata", str(csv), "--method", method, "--npy",
              *(["--tta"] if method != "scorecam" else [])]  # ScoreCAM's masked batches are what it tests
    together = explained(explain(runner, *map(str, photos), *common, "-o", str(tmp_path / "all")))
    for photo, answer in zip(photos, together["images"]):
        alone = explained(explain(runner, str(photo), *common, "--batch-size", "1", "-o", str(tmp_path / photo.stem)))
        assert alone["images"][0]["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / "all" / f"{photo.stem}.cam.npy"),
                                   np.load(tmp_path / photo.stem / f"{photo.stem}.cam.npy"), atol=1e-4)
    assert explained(explain(runner, str(photos[0]), *common[:4], "--no-cam", "-o", str(tmp_path / "n")))[
        "images"][0]["metadata"]["known"] == ["age", "sex", "site"]


def test_a_metadata_csv_beside_the_images_is_used_and_named(runner, fused, photos, tmp_path) -> None:
    (photos[0].parent / "metadata.csv").write_text("image;age;sex;localization\nlesion_2.jpg;60;female;back\n")
    result = runner.invoke(app, ["explain", str(photos[0].parent), "-c", fused, "--device", "cpu", "-o",
                                 str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Metadata: the model reads age, sex, site; from " in result.stdout
    assert "2 of 3 images answered without metadata" in result.stdout
    data = json.loads((tmp_path / "out" / "lesion_2.json").read_text())
    assert data["metadata"]["known"] == ["age", "sex", "site"]
    assert data["metadata"]["source"] == str(photos[0].parent / "metadata.csv")


def test_a_model_without_metadata_ignores_the_csv_with_a_note(runner, plain, photos, tmp_path) -> None:
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age\nlesion_0.jpg,40\n")
    given = runner.invoke(app, ["explain", str(photos[0]), "-c", plain, "--device", "cpu", "--json",
                                "--metadata", str(csv), "-o", str(tmp_path / "a")])
    assert given.exit_code == 0, given.output
    out = json.loads(given.stdout)
    assert out["metadata"] is None and out["images"][0]["metadata"] is None
    assert any("reads no patient metadata" in w for w in out["warnings"])
    bare = explained(explain(runner, str(photos[0]), "-c", plain, "-o", str(tmp_path / "b")))
    assert bare["images"][0]["probabilities"] == out["images"][0]["probabilities"]


def test_a_bad_metadata_csv_is_exit_2_before_the_model_loads(runner, fused, photos, tmp_path, monkeypatch) -> None:
    from dermcam.store import inference

    monkeypatch.setattr(inference, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    csv = tmp_path / "meta.csv"
    csv.write_text("who,age\nlesion_0.jpg,40\n")
    one_line_error(runner.invoke(app, ["explain", str(photos[0]), "-c", fused, "--metadata", str(csv)]), 2,
                   "no image column")
    one_line_error(runner.invoke(app, ["explain", str(photos[0]), "-c", fused, "--metadata",
                                       str(tmp_path / "nope.csv")]), 3, "nope.csv")


def test_an_ensemble_gives_its_metadata_members_their_rows(runner, fused, plain, photos, tmp_path) -> None:
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import resolve

    save_ensemble(new_manifest("mixed", [resolve(fused), resolve(plain)], [1.0, 1.0]))
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age,sex,site\nlesion_0.jpg,80,male,face\n")
    with_meta = explained(explain(runner, str(photos[0]), str(photos[1]), "-c", "ensemble:mixed", "--metadata",
                                  str(csv), "-o", str(tmp_path / "a")))
    without = explained(explain(runner, str(photos[0]), str(photos[1]), "-c", "ensemble:mixed", "-o",
                                str(tmp_path / "b")))
    assert with_meta["images"][0]["metadata"]["known"] == ["age", "sex", "site"]
    assert with_meta["images"][0]["probabilities"] != pytest.approx(without["images"][0]["probabilities"], abs=1e-3)
    assert with_meta["images"][1]["probabilities"] == pytest.approx(without["images"][1]["probabilities"], abs=1e-5)
    assert (tmp_path / "a" / "lesion_0.cam.png").is_file()


# -- serve ------------------------------------------------------------------------------------------------

def _client(ref: str):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from test_serve import make_app

    return TestClient(make_app(ref, max_files=4), base_url="http://127.0.0.1")


def _post(client, photos: list[Path], cam: bool = False, **fields):
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    return client.post("/v1/predict" + ("?cam=1" if cam else ""), files=files, data=fields)


def test_serve_takes_form_fields_batched_per_image_and_says_what_it_used(runner, fused, photos, tmp_path) -> None:
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age,sex,site\nlesion_0.jpg,80,male,face\nlesion_1.jpg,20,female,back\n")
    expected = explained(explain(runner, *map(str, photos), "-c", fused, "--metadata", str(csv), "-o",
                                 str(tmp_path / "out")))["images"]
    with _client(fused) as client:
        card = client.get("/v1/model").json()["metadata"]
        assert card["fields"] == ["age", "sex", "site"] and card["sites"] == SITES
        assert card["sexes"] == ["female", "male"] and card["age_range"] == [0.0, 120.0]
        # one field per file, in the order of the files; the third image's fields are empty
        body = _post(client, photos, age=["80", "20", ""], sex=["male", "female", ""], site=["face", "back", ""])
        assert body.status_code == 200, body.text
        answers = body.json()["images"]
        for got, want in zip(answers, expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
            assert got["decision"] == want["decision"]
        assert answers[0]["metadata"] == {"fields": ["age", "sex", "site"], "known": ["age", "sex", "site"],
                                          "answered": "answered with age, sex, site", "source": "form"}
        assert answers[2]["metadata"]["answered"] == "answered without metadata"
        # one value for every file; an unseen site is unknown, and says so
        both = _post(client, photos[:2], age="80", site="scalp").json()["images"]
        assert [a["metadata"]["known"] for a in both] == [["age"], ["age"]]
        assert both[0]["metadata"]["answered"] == "answered with age (sex, site unknown)"
        # the batcher runs concurrent images with different metadata in one batch, each with its own
        with_cam = _post(client, photos[:1], cam=True, age="80", sex="male", site="face").json()["images"][0]
        assert with_cam["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-5)
        assert with_cam["cam"]["target"] == expected[0]["decision"] and with_cam["metadata"]["known"]
        nothing = _post(client, photos[:1]).json()["images"][0]
        assert nothing["metadata"]["answered"] == "answered without metadata"


def test_concurrent_images_with_other_metadata_share_a_batch_each_with_its_own(fused, photos) -> None:
    import dataclasses

    pytest.importorskip("fastapi")
    from dermcam.serve.batching import MicroBatcher
    from dermcam.serve.model import ServedModel, form_rows, read_upload

    served = ServedModel.load(fused, device="cpu")
    rows = form_rows(3, ["80", "20", ""], ["male", "female", ""], ["face", "back", ""])
    uploads = [dataclasses.replace(read_upload(p.name, p.read_bytes(), served.preprocessing), metadata=r)
               for p, r in zip(photos, rows)]
    batcher = MicroBatcher(served.predict, max_batch=8, max_wait_s=2.0)
    try:
        batched = [f.result(timeout=60) for f in [batcher.submit(u) for u in uploads]]
    finally:
        batcher.stop()
    assert batcher.stats()["largest_batch"] == 3
    for answer, upload in zip(batched, uploads):
        alone = served.predict([upload])[0]
        assert answer.probabilities == pytest.approx(alone.probabilities, abs=1e-5)
        assert answer.metadata == alone.metadata
    assert batched[0].probabilities != pytest.approx(batched[2].probabilities, abs=1e-3)


@pytest.mark.parametrize("fields, status, words", [
    ({"age": "abc"}, 400, "age must be a number"), ({"age": "-3"}, 400, "0 to 120"),
    ({"sex": "yes"}, 400, "sex must be"), ({"age": ["1", "2"]}, 400, "2 'age' fields for 3 images"),
    ({"site": "a\u0007b"}, 400, "site must be")])
def test_a_bad_form_field_is_a_4xx_with_one_line_of_json(fused, photos, fields, status, words) -> None:
    from test_serve import one_line_error

    with _client(fused) as client:
        response = _post(client, photos, **fields)
        assert response.status_code == status, response.text
        assert words in one_line_error(response)
        assert _post(client, photos[:1], age="50").status_code == 200


def test_a_model_without_metadata_shows_no_inputs_and_ignores_fields(plain, photos) -> None:
    with _client(plain) as client:
        assert client.get("/v1/model").json()["metadata"] is None
        bare = _post(client, photos[:1]).json()["images"][0]
        sent = _post(client, photos[:1], age="40").json()["images"][0]
    assert bare["metadata"] is None and bare["probabilities"] == sent["probabilities"]
    assert "ignored" in sent["metadata"]["answered"]


def test_the_page_has_metadata_inputs_shown_only_for_a_metadata_model(fused) -> None:
    with _client(fused) as client:
        html = client.get("/").text
    assert 'id="meta-box" hidden' in html and "showMetadataForm(c.metadata)" in html
    assert 'form.append(field, value)' in html


# -- report.html ------------------------------------------------------------------------------------------

def test_the_report_names_the_fields_and_how_many_images_had_none(runner, home: Path, tmp_path: Path) -> None:
    from conftest import run_json

    [result] = run_json(runner, ["train", "--backbone", "test_efficientnet", "--pretrained", "none", "--image-size",
                                 "48", "--batch-size", "16", "--data", "synth", "--epochs", "1", "--metadata",
                                 "age,sex,site", "--json"])
    out = tmp_path / "report"
    made = run_json(runner, ["report", result["best_checkpoint"], "--out", str(out), "--json"])
    html = Path(made["report"]).read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["metadata"]["images"]
    assert "patient metadata" in html and "age, sex, site (fused with the image features)" in html
    assert f"age {metrics['metadata']['known']['age']}/{n}" in html
    assert f"0 of {n} images had none" in html
    assert 'id="gallery"' in html and "no Grad-CAM" not in html


def test_the_report_of_a_model_without_metadata_says_none() -> None:
    from dermcam.report.gallery import Gallery
    from dermcam.report.sections import ReportInputs, metadata_facts

    def inputs(sidecar: dict, metrics: dict) -> ReportInputs:
        return ReportInputs(metrics, sidecar, None, None, {}, Gallery(), {}, "now")

    assert metadata_facts(inputs({"classes": CLASSES}, {"metadata": None})) == [
        ("patient metadata", "none: the image only")]
    summary = {"fields": ["age", "sex", "site"], "images": 10, "known": {"age": 7, "sex": 10, "site": 4},
               "without_metadata": 2}
    ensemble = {"kind": "ensemble", "classes": CLASSES, "members": [{"id": "a"}, {"id": "b", "metadata": spec_block()}]}
    assert metadata_facts(inputs(ensemble, {"metadata": summary})) == [
        ("patient metadata", "age, sex, site (fused with the image features)"),
        ("metadata in this evaluation",
         "known: age 7/10, sex 10/10, site 4/10; 2 of 10 images had none (answered from the image alone)")]


# -- exported files: safetensors and ONNX -----------------------------------------------------------------

def _cache_pixels_and_rows(ref: str, photos: list[Path], rows: list[dict | None]):
    from dermcam.data.geometry import cache_size
    from dermcam.data.images import decode_image
    from dermcam.data.metadata import model_metadata
    from dermcam.data.metadata_input import frame_of
    from dermcam.store.inference import load_for_inference

    model, side = load_for_inference(ref)
    pixels = np.stack([decode_image(p, cache_size(side["preprocessing"]))[0] for p in photos])
    return model, side, pixels, model_metadata(side, frame_of(rows))


ROWS = [{"age": "80", "sex": "male", "localization": "face"}, None,
        {"age": "20", "sex": "female", "localization": "back"}]


def test_a_safetensors_export_reloads_as_a_model_taking_metadata(runner, fused, photos, tmp_path) -> None:
    from dermcam.models.metadata import uses_metadata
    from dermcam.store.exported import load_exported

    exported = tmp_path / "fused.safetensors"
    assert runner.invoke(app, ["ckpt", "export", fused, "-o", str(exported)]).exit_code == 0
    model, side = load_exported(exported)
    assert uses_metadata(model) and side["metadata"]["fields"] == ["age", "sex", "site"]
    csv = tmp_path / "meta.csv"
    csv.write_text("image,age,sex,site\nlesion_0.jpg,80,male,face\n")
    a = explained(explain(runner, str(photos[0]), "-c", fused, "--metadata", str(csv), "-o", str(tmp_path / "a")))
    b = explained(explain(runner, str(photos[0]), "-c", str(exported), "--metadata", str(csv), "-o",
                          str(tmp_path / "b")))
    assert a["images"][0]["probabilities"] == pytest.approx(b["images"][0]["probabilities"], abs=1e-6)
    assert b["images"][0]["metadata"]["known"] == ["age", "sex", "site"]


def test_onnx_export_takes_a_metadata_input_and_matches_pytorch(runner, fused, photos, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from dermcam.data.geometry import model_input

    out = tmp_path / "fused.onnx"
    result = runner.invoke(app, ["ckpt", "export", fused, "--format", "onnx", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["check_gap"] <= 1e-4
    model, side, pixels, rows = _cache_pixels_and_rows(fused, photos, ROWS)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "metadata"]
    document = json.loads(session.get_modelmeta().custom_metadata_map["dermcam"])
    described = document["graph"]["inputs"][1]
    assert document["metadata"]["fields"] == ["age", "sex", "site"]
    assert described["shape"] == ["batch", rows.shape[1]] and described["features"] == document["metadata"]["features"]
    np.testing.assert_array_equal(rows[1], described["unknown"])
    logits, probs = session.run(None, {"image": pixels, "metadata": rows})
    with torch.no_grad():
        x = torch.stack([model_input(p, side["preprocessing"]) for p in pixels])
        expected = model(x, torch.from_numpy(rows))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(probs, expected.softmax(1).numpy(), atol=1e-4)
    assert np.abs(probs[0] - probs[1]).max() > 1e-2  # the metadata input counts


def test_an_ensemble_with_a_metadata_member_exports_to_onnx(runner, fused, plain, photos, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from dermcam.data.geometry import to_float
    from dermcam.store.ensembles import new_manifest, save_ensemble
    from dermcam.store.references import resolve

    save_ensemble(new_manifest("mixed", [resolve(fused), resolve(plain)], [1.0, 1.0]))
    out = tmp_path / "mixed.onnx"
    result = runner.invoke(app, ["ckpt", "export", "ensemble:mixed", "--format", "onnx", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    model, _, pixels, rows = _cache_pixels_and_rows("ensemble:mixed", photos, ROWS)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    described = json.loads(session.get_modelmeta().custom_metadata_map["dermcam"])["graph"]["inputs"][1]
    assert [(m["id"], m["offset"]) for m in described["members"]] == [(fused, 0)]
    _, probs = session.run(None, {"image": pixels, "metadata": rows[0]})
    with torch.no_grad():
        expected = model(to_float(pixels), [torch.from_numpy(rows[0]), None]).softmax(1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)
