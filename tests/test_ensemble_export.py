"""dermcam ckpt export ensemble:NAME: one file that answers as the ensemble does, in dermcam and without it.

Two tiny runs of different architectures and input sizes (test_resnet at 56x40, test_efficientnet at
48x48, both calibrated by training) are trained once per module and combined with unequal weights and
an operating point; every test works on its own copy of that store.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dermcam.cli import app
from dermcam.store.paths import home
from test_ckpt import invoke, list_json, snapshot
from test_export import join_file, split_file
from test_onnx import WITHOUT_DERMCAM

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"
NAME = "duo"
REF = f"ensemble:{NAME}"
TRAIN = ["--pretrained", "none", "--epochs", "1", "--batch-size", "16", "--data", "synth", "--json"]


@pytest.fixture(scope="module")
def trained(prepared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two trained runs and the ensemble 'duo' (weights 2:1, an operating point on mel)."""
    from typer.testing import CliRunner

    base = tmp_path_factory.mktemp("ensemble-export-store")
    shutil.copytree(prepared_store / "datasets", base / "datasets")
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMCAM_HOME", str(base))
        for args in (["train", "--backbone", "test_resnet", "--image-size", "56x40", "--seed", "2", *TRAIN],
                     ["train", "--backbone", "test_efficientnet", "--image-size", "48", "--seed", "0", *TRAIN],
                     ["ensemble", "create", NAME, "--top", "2", "--weights", "2,1",
                      "--operating-point", "mel:sensitivity=0.8", "--json"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
    return base


@pytest.fixture
def store(trained: Path, dermcam_home: Path) -> Path:
    """This test's DERMCAM_HOME: a copy of the trained store."""
    for folder in ("datasets", "runs", "ensembles"):
        shutil.copytree(trained / folder, dermcam_home / folder)
    return dermcam_home


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four synthetic dermoscopy JPEGs at HAM10000's 600x450 (large enough for a reduced-scale decode)."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    folder = write_synthetic_ham10000(tmp_path_factory.mktemp("photos"), n_lesions_per_class=2,
                                      images_per_lesion=(1, 1), size=(600, 450), seed=5)
    return sorted(folder.rglob("*.jpg"))[:4]


def export(runner, out: Path, *extra: str) -> dict:
    result = invoke(runner, "export", REF, "-o", str(out), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def metadata(path: Path) -> dict:
    return json.loads(split_file(path)[0]["__metadata__"]["dermcam"])


def with_meta(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` whose metadata document ``change(meta)`` edited in place (tensors untouched)."""
    header, data = split_file(src)
    meta = json.loads(header["__metadata__"]["dermcam"])
    change(meta)
    header["__metadata__"]["dermcam"] = json.dumps(meta)
    return join_file(dst, header, data)


def probabilities(ref: str | Path, photos: list[Path], calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(cache pixels, probabilities) the way evaluate and explain compute them (load_for_inference)."""
    import torch

    from dermcam.data.geometry import cache_size, model_input
    from dermcam.data.images import decode_image
    from dermcam.evaluate.operating import model_outputs
    from dermcam.store.inference import load_for_inference

    model, side = load_for_inference(ref, calibrated=calibrated)
    pixels = np.stack([decode_image(p, cache_size(side["preprocessing"]))[0] for p in photos])
    with torch.no_grad():
        logits = model(torch.stack([model_input(p, side["preprocessing"]) for p in pixels]))
    return pixels, model_outputs(logits.softmax(1).numpy(), side, calibrated=calibrated).probs


def assert_close(a: object, b: object, tolerance: float = 1e-6, where: str = "") -> None:
    """Equal JSON documents, numbers within ``tolerance`` (the same probabilities within 1e-6 score the same)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_close(a[key], b[key], tolerance, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tolerance, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=tolerance), where
    else:
        assert a == b, where


def test_export_writes_members_under_prefixes_and_records_them(runner, store: Path, tmp_path: Path) -> None:
    from dermcam.store.ensembles import read_ensemble
    from dermcam.store.exported import tensor_digest

    result = export(runner, tmp_path)  # a folder: the default name
    out = Path(result["file"])
    assert out.name == "dermcam-ensemble-duo.safetensors" and result["kind"] == "ensemble" and result["id"] == REF
    manifest = read_ensemble(NAME).manifest
    meta = metadata(out)
    assert meta["schema"] == "dermcam.ensemble-export/1" and meta["kind"] == "ensemble" and meta["name"] == NAME
    assert meta["classes"] == manifest["classes"] and meta["rule"] == manifest["rule"]
    assert meta["operating_point"] == manifest["operating_point"] and meta["dtype"] == "float32"
    assert meta["preprocessing"]["cache_size"] == [64, 48] and meta["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert {"dermcam", "torch", "timm"} <= set(meta["versions"])
    members = meta["members"]
    assert [m["prefix"] for m in members] == ["members.0.", "members.1."]
    assert [m["backbone"] for m in members] == ["test_resnet", "test_efficientnet"]
    assert [m["weight"] for m in members] == pytest.approx([2 / 3, 1 / 3], abs=1e-12)
    assert [m["preprocessing"]["input_size"] for m in members] == [[3, 40, 56], [3, 48, 48]]
    for member, record in zip(members, manifest["members"]):
        assert member["source"]["id"] == record["id"] and member["source"]["sha256"] == record["sha256"]
        assert member["calibration"] == record["calibration"] and member["calibration"]["method"] == "temperature"
        assert member["num_classes"] == 3 and member["config"]["backbone"] == member["backbone"]

    from safetensors.torch import load_file

    tensors = load_file(str(out))
    for member in members:  # each member's digest covers exactly its own tensors, names without the prefix
        own = {k.removeprefix(member["prefix"]): v for k, v in tensors.items() if k.startswith(member["prefix"])}
        assert own and tensor_digest(own) == member["tensors_sha256"]
    assert all(k.startswith(("members.0.", "members.1.")) for k in tensors)

    rows = {r["id"]: r for r in list_json(runner)}
    for record in manifest["members"]:  # recorded in each member's run
        row = rows[record["id"]]
        assert "exported" in row["flags"]
        assert [(e["file"], e["ensemble"], e["format"]) for e in row["exports"]] == [(str(out), NAME, "safetensors")]

    again = invoke(runner, "export", REF, "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert invoke(runner, "export", NAME, "-o", str(out), "--force").exit_code == 0  # a bare name works too



def test_evaluate_and_load_the_file_exactly_as_the_ensemble(runner, store: Path, tmp_path: Path,
                                                            photos: list[Path]) -> None:
    from dermcam.store.ensembles import read_ensemble, scoring_document
    from dermcam.store.exported import load_exported

    out = Path(export(runner, tmp_path / "duo.safetensors")["file"])
    reports = {}
    for label, ref in (("named", REF), ("file", str(out))):
        result = runner.invoke(app, ["evaluate", ref, "--resamples", "0", "--json", "-o", str(tmp_path / label)])
        assert result.exit_code == 0, result.output
        reports[label] = json.loads(result.stdout)
    named, from_file = reports["named"], reports["file"]
    assert named["dataset"] == from_file["dataset"] == "synth" and named["classes"] == from_file["classes"]
    assert_close(named["metrics"], from_file["metrics"])
    assert_close(named["subgroups"], from_file["subgroups"])
    assert named["metrics"]["operating_point"]["threshold"] == read_ensemble(NAME).manifest["operating_point"]["threshold"]

    answers = {}
    for calibrated in (True, False):  # --no-calibration: the mean of the members' raw softmaxes, both ways
        _, answers[calibrated] = probabilities(REF, photos, calibrated)
        _, got = probabilities(out, photos, calibrated)
        assert np.abs(got - answers[calibrated]).max() <= 1e-6, calibrated
    assert np.abs(answers[True] - answers[False]).max() > 1e-3  # the members' calibrations were applied

    model, info = load_exported(out)
    document = scoring_document(read_ensemble(NAME))
    assert type(model).__name__ == "EnsembleModel" and not model.training
    assert set(document) <= set(info)
    for key in ("kind", "name", "classes", "backbone", "preprocessing", "dataset", "calibration", "operating_point",
                "rule"):
        assert info[key] == document[key], key
    assert info["calibration"] == {"method": "members", "temperature": None}
    assert [(m["id"], m["sha256"], m["backbone"]) for m in info["members"]] == \
        [(m["id"], m["sha256"], m["backbone"]) for m in document["members"]]
    assert info["id"] == "duo.safetensors" and info["source_id"] == REF and len(info["sha256"]) == 64


def test_explain_with_the_file(runner, store: Path, tmp_path: Path, photos: list[Path]) -> None:
    out = Path(export(runner, tmp_path / "duo.safetensors")["file"])
    answers = {}
    for label, ref in (("named", REF), ("file", str(out))):
        result = runner.invoke(app, ["explain", *map(str, photos[:2]), "-c", ref, "--json", "--score", "--npy",
                                     "-o", str(tmp_path / label)])
        assert result.exit_code == 0, result.output
        answers[label] = json.loads(result.stdout)
    named, from_file = answers["named"], answers["file"]
    assert named["layer"] == from_file["layer"] and named["calibration"] == from_file["calibration"]
    assert named["operating_point"] == from_file["operating_point"]
    for a, b in zip(named["images"], from_file["images"]):
        assert a["probabilities"] == b["probabilities"] and a["decision"] == b["decision"]
        assert a["faithfulness"] == pytest.approx(b["faithfulness"], abs=1e-5)  # the same maps, the same forward
    sidecars = [json.loads(min((tmp_path / label).glob("*.json")).read_text()) for label in ("named", "file")]
    assert [m["id"] for m in sidecars[0]["checkpoint"]["members"]] == \
        [m["id"] for m in sidecars[1]["checkpoint"]["members"]]
    assert sidecars[0]["target_layer"] == sidecars[1]["target_layer"] and sidecars[1]["checkpoint"]["id"] == out.name
    for named_map in sorted((tmp_path / "named").glob("*.cam.npy")):  # the members' maps, averaged the same way
        assert np.abs(np.load(named_map) - np.load(tmp_path / "file" / named_map.name)).max() < 1e-5


def test_half_and_bf16_halve_the_file_and_still_answer(runner, store: Path, tmp_path: Path, photos: list[Path]) -> None:
    full = Path(export(runner, tmp_path / "full.safetensors")["file"])
    half = export(runner, tmp_path, "--half")
    bf16 = Path(export(runner, tmp_path / "bf16.safetensors", "--bf16")["file"])
    assert Path(half["file"]).name == "dermcam-ensemble-duo-fp16.safetensors" and half["dtype"] == "float16"
    assert Path(half["file"]).stat().st_size < 0.6 * full.stat().st_size
    assert metadata(bf16)["dtype"] == "bfloat16"
    _, expected = probabilities(full, photos)
    for path, tolerance in ((Path(half["file"]), 2e-2), (bf16, 5e-2)):
        assert np.abs(probabilities(path, photos)[1] - expected).max() < tolerance
    both = invoke(runner, "export", REF, "--half", "--bf16", "-o", str(tmp_path / "x.safetensors"))
    assert both.exit_code == 2


def restore(runner, path: Path, *extra: str) -> dict:
    result = invoke(runner, "restore", str(path), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_restore_brings_an_exported_ensemble_into_another_store(runner, store: Path, tmp_path: Path,
                                                                 photos: list[Path], monkeypatch) -> None:
    """A hospital receives the file: after ``ckpt restore`` the ensemble is in its store by name, its
    members are imported checkpoints, and it answers exactly as the file (and the original) does."""
    from dermcam.store.ensembles import read_ensemble

    out = Path(export(runner, tmp_path / "duo.safetensors")["file"])
    _, expected = probabilities(out, photos)
    original = read_ensemble(NAME).manifest
    other = tmp_path / "hospital"
    shutil.copytree(store / "datasets", other / "datasets")
    monkeypatch.setenv("DERMCAM_HOME", str(other))

    result = restore(runner, out)
    assert result["kind"] == "ensemble" and result["created"] is True and result["id"] == REF
    assert [m["created"] for m in result["members"]] == [True, True]
    assert [m["backbone"] for m in result["members"]] == ["test_resnet", "test_efficientnet"]
    manifest = read_ensemble(NAME).manifest
    assert [m["weight"] for m in manifest["members"]] == pytest.approx([2 / 3, 1 / 3], abs=1e-12)
    assert [m["calibration"] for m in manifest["members"]] == [m["calibration"] for m in original["members"]]
    assert manifest["operating_point"] == original["operating_point"]
    rows = {r["id"]: r for r in list_json(runner)}
    for member in result["members"]:
        assert "imported" in rows[member["id"]]["flags"] and not rows[member["id"]]["resumable"]
    _, got = probabilities(REF, photos)
    assert np.abs(got - expected).max() <= 1e-6
    listed = runner.invoke(app, ["ensemble", "list", "--json"])
    assert listed.exit_code == 0 and NAME in listed.stdout

    before = snapshot(other)  # the same file again: nothing changes
    again = restore(runner, out)
    assert again["created"] is False and not any(m["created"] for m in again["members"])
    assert snapshot(other) == before
    text = invoke(runner, "restore", str(out))
    assert text.exit_code == 0 and "already in the store" in text.stdout


def test_restore_in_the_store_it_came_from_reuses_the_members(runner, store: Path, tmp_path: Path,
                                                               photos: list[Path]) -> None:
    from dermcam.store.ensembles import read_ensemble

    out = Path(export(runner, tmp_path / "duo.safetensors")["file"])
    runs = sorted(p.name for p in (store / "runs").iterdir())
    assert restore(runner, out)["created"] is False  # 'duo' is this very ensemble
    copy = restore(runner, out, "--name", "duo-copy")
    assert copy["created"] is True and copy["id"] == "ensemble:duo-copy"
    assert not any(m["created"] for m in copy["members"])  # the source checkpoints themselves
    assert sorted(p.name for p in (store / "runs").iterdir()) == runs
    assert [m["id"] for m in read_ensemble("duo-copy").manifest["members"]] == \
        [m["id"] for m in read_ensemble(NAME).manifest["members"]]
    assert np.abs(probabilities("ensemble:duo-copy", photos)[1] - probabilities(REF, photos)[1]).max() <= 1e-6


def test_restore_refuses_a_taken_name_a_damaged_file_and_a_misplaced_name(runner, store: Path,
                                                                          tmp_path: Path) -> None:
    out = Path(export(runner, tmp_path / "duo.safetensors")["file"])
    created = runner.invoke(app, ["ensemble", "create", "other", "--top", "1", "--json"])
    assert created.exit_code == 0, created.output
    renamed = with_meta(out, tmp_path / "renamed.safetensors", lambda m: m.update(name="other"))
    folder = tmp_path / "bad"
    folder.mkdir()
    damaged = _damaged(out, folder)
    before = snapshot(home())
    taken = invoke(runner, "restore", str(renamed))
    assert taken.exit_code == 2 and "--name" in taken.stderr and taken.stderr.count("\n") == 1, taken.output
    for name in ("flipped.safetensors", "digest.safetensors", "weights.safetensors"):
        path, code, words = damaged[name]
        result = invoke(runner, "restore", str(path))
        assert result.exit_code == code and words in result.stderr, (name, result.output)
    assert snapshot(home()) == before
    single = invoke(runner, "export", f"{list_json(runner)[0]['id']}", "-o", str(tmp_path / "one.safetensors"))
    assert single.exit_code == 0, single.output
    before = snapshot(home())
    misplaced = invoke(runner, "restore", str(tmp_path / "one.safetensors"), "--name", "x")
    assert misplaced.exit_code == 2 and "--name" in misplaced.stderr, misplaced.output
    bad_name = invoke(runner, "restore", str(out), "--name", "best")
    assert bad_name.exit_code == 2 and bad_name.stderr.count("\n") == 1, bad_name.output
    assert snapshot(home()) == before


def _damaged(good: Path, folder: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (file, exit code, words of the message): ways an exported ensemble can be wrong."""
    raw = good.read_bytes()
    header, data = split_file(good)
    files: dict[str, tuple[Path, int, str]] = {}

    def put(name: str, content: bytes, code: int, words: str) -> None:
        (folder / name).write_bytes(content)
        files[name] = (folder / name, code, words)

    def meta(name: str, code: int, words: str, change) -> None:
        files[name] = (with_meta(good, folder / name, change), code, words)

    flipped = bytearray(raw)
    flipped[-7] ^= 0x5A
    put("flipped.safetensors", bytes(flipped), 4, "do not match the digest")
    put("truncated.safetensors", raw[: len(raw) - 64], 4, "truncated")
    meta("prefix-moved.safetensors", 4, "belong to no member",
         lambda m: m["members"][1].update(prefix="members.7."))
    meta("prefixes-swapped.safetensors", 4, "do not match backbone",
         lambda m: (m["members"][0].update(prefix="members.1."), m["members"][1].update(prefix="members.0.")))
    meta("digest.safetensors", 4, "member 0 (members.0.*) do not match the digest",
         lambda m: m["members"][0].update(tensors_sha256="0" * 64))
    meta("no-digest.safetensors", 4, "tensors_sha256", lambda m: m["members"][0].pop("tensors_sha256"))
    meta("weights.safetensors", 4, "sum to", lambda m: m["members"][0].update(weight=5.0))
    meta("classes.safetensors", 4, "num_classes", lambda m: m["members"][1].update(num_classes=4))
    meta("cache.safetensors", 4, "cache size",
         lambda m: m["members"][1]["preprocessing"].update(cache_size=[32, 24]))
    meta("backbone.safetensors", 2, "unknown backbone", lambda m: m["members"][0].update(backbone="no_such_net"))
    meta("other-schema.safetensors", 2, "unsupported export schema", lambda m: m.update(schema="dermcam.ensemble-export/9"))
    meta("point.safetensors", 4, "operating_point", lambda m: m["operating_point"].update({"class": "xyz"}))
    renamed = {("members.0.head.weight" if k == "members.0.fc.weight" else k): v for k, v in header.items()}
    files["renamed.safetensors"] = (join_file(folder / "renamed.safetensors", renamed, data), 4,
                                    "unexpected ['members.0.head.weight']")
    copied = {**header, "members.1.extra": header["members.0.fc.bias"]}  # bytes it does not hold (a member's)
    files["overlap.safetensors"] = (join_file(folder / "overlap.safetensors", copied, data), 4, "overlap")
    return files


def test_a_damaged_file_is_one_line_and_nothing_loads(runner, store: Path, tmp_path: Path,
                                                      photos: list[Path]) -> None:
    from dermcam.errors import CorruptError
    from dermcam.store.exported import load_exported

    good = Path(export(runner, tmp_path / "good.safetensors")["file"])
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, (path, code, words) in _damaged(good, folder).items():
        result = runner.invoke(app, ["evaluate", str(path), "--resamples", "0"])
        assert result.exit_code == code, (name, result.output)
        assert words in result.stderr, (name, result.stderr)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
        assert "Traceback" not in result.output, name
    with pytest.raises(CorruptError, match="digest"):
        load_exported(folder / "flipped.safetensors")
    explained = runner.invoke(app, ["explain", str(photos[0]), "-c", str(folder / "digest.safetensors"),
                                    "-o", str(tmp_path / "x")])
    assert explained.exit_code == 4 and "digest" in explained.stderr


def test_export_refuses_a_pruned_or_damaged_member(runner, store: Path, tmp_path: Path) -> None:
    from dermcam.store.ensembles import member_checkpoints, read_ensemble

    first, second = member_checkpoints(read_ensemble(NAME))
    data = bytearray(second.weights_path.read_bytes())
    data[-1] ^= 0xFF
    second.weights_path.write_bytes(bytes(data))
    damaged = invoke(runner, "export", REF, "-o", str(tmp_path / "x.safetensors"))
    assert damaged.exit_code == 4 and "sha256" in damaged.stderr, damaged.output
    shutil.rmtree(first.run_dir)
    for fmt in ("safetensors", "onnx"):
        gone = invoke(runner, "export", REF, "--format", fmt, "-o", str(tmp_path / "x"))
        assert gone.exit_code in (2, 3) and gone.stderr.count("\n") == 1, gone.output  # 2: no onnxruntime here
    assert not list(tmp_path.iterdir())


def _docs_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    matching = [b for b in blocks if marker in b]
    assert len(matching) == 1, f"docs/checkpoints.md should hold exactly one snippet with {marker!r}"
    return matching[0]


def run_snippet(folder: Path, snippet: str) -> dict[str, float]:
    (folder / "snippet.py").write_text(snippet)
    proc = subprocess.run([sys.executable, "-I", "-c", WITHOUT_DERMCAM], cwd=folder, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the snippet prints {class: probability}


def test_the_docs_snippet_runs_without_dermcam_and_agrees(runner, store: Path, tmp_path: Path,
                                                          photos: list[Path]) -> None:
    """The 'Exporting an ensemble' block of docs/checkpoints.md, as it stands: timm + safetensors only."""
    snippet = _docs_block('meta["members"]')
    file = re.search(r'path = "([^"]+)"', snippet).group(1)
    export(runner, tmp_path / file)
    (tmp_path / "lesion.jpg").write_bytes(photos[0].read_bytes())
    printed = run_snippet(tmp_path, snippet)
    expected = probabilities(tmp_path / file, photos[:1])[1][0]
    assert list(printed) == metadata(tmp_path / file)["classes"]
    assert np.abs(np.array(list(printed.values())) - expected).max() <= 1e-4 + 5e-5  # printed rounded to 4 places


def test_onnx_export_of_an_ensemble_agrees_with_pytorch(runner, store: Path, tmp_path: Path,
                                                        photos: list[Path]) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    result = invoke(runner, "export", REF, "--format", "onnx", "-o", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    out = Path(exported["file"])
    assert out.name == "dermcam-ensemble-duo.onnx" and exported["check_gap"] <= 1e-4 and exported["kind"] == "ensemble"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dermcam"])
    assert meta["schema"] == "dermcam.ensemble-onnx/1" and meta["graph"]["input"]["shape"] == ["batch", 48, 64, 3]
    assert [m["prefix"] for m in meta["members"]] == ["members.0.", "members.1."]
    assert not any("tensors_sha256" in m for m in meta["members"])

    pixels, expected = probabilities(REF, photos)
    logits, probs = session.run(None, {"image": pixels})
    one = session.run(None, {"image": pixels[:1]})[1]
    assert np.abs(probs - expected).max() < 1e-4 and np.abs(one - expected[:1]).max() < 1e-4
    assert np.abs(np.exp(logits) - expected).max() < 1e-4  # logits = log p
    rows = {r["id"]: r for r in list_json(runner)}
    assert all(any(e["format"] == "onnx" for e in rows[m["source"]["id"]]["exports"]) for m in meta["members"])

    # the ONNX Runtime snippet of docs/checkpoints.md runs an ensemble's graph unchanged
    (tmp_path / "model.onnx").write_bytes(out.read_bytes())
    (tmp_path / "lesion.jpg").write_bytes(photos[0].read_bytes())
    printed = run_snippet(tmp_path, _docs_block("onnxruntime.InferenceSession"))
    assert np.abs(np.array(list(printed.values())) - probabilities(REF, photos[:1])[1][0]).max() <= 1.5e-4


def test_export_help_names_ensembles(runner) -> None:
    result = runner.invoke(app, ["ckpt", "export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "ensemble:NAME" in result.output
