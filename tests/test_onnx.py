"""dermcam ckpt export --format onnx: ONNX Runtime gives dermcam's calibrated probabilities, without dermcam."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dermcam.cli import app
from dermcam.store.checkpoint import save_checkpoint
from dermcam.store.runs import create_run
from test_ckpt import CLASSES, invoke, list_json, model_state, sidecar

pytest.importorskip("onnxruntime")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"
CACHE = [64, 48]  # width, height: resized in the graph to the input size below
INPUT_SIZE = [3, 40, 56]
CALIBRATIONS = {
    "temperature": {"method": "temperature", "temperature": 1.7},
    "vector": {"method": "vector", "temperature": 1.7, "scale": [0.8, 1.3, 0.6], "bias": [0.2, -0.4, 0.3]},
}
OPERATING_POINT = {"class": "mel", "metric": "sensitivity", "target": 0.9, "threshold": 0.31}


def make_checkpoint(run_id: str, calibration: str | None) -> str:
    """A tiny checkpoint with a 64x48 cache, a 56x40 input and (optionally) a calibration; its id.

    The head is scaled up so that the random network's probabilities are far from uniform: a wrong
    resize, normalisation or calibration then moves them visibly.
    """
    state = dict(model_state())
    state["classifier.weight"] = state["classifier.weight"] * 40
    side = sidecar(0.8)
    side["preprocessing"] = {**side["preprocessing"], "input_size": INPUT_SIZE, "cache_size": CACHE}
    if calibration:
        side.update(calibration=CALIBRATIONS[calibration], operating_point=OPERATING_POINT)
    run_dir = create_run({"backbone": side["backbone"]}, run_id=run_id)
    return save_checkpoint(run_dir, epoch=0, model_state=state, sidecar=side).id


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five synthetic dermoscopy JPEGs at HAM10000's 600x450 (large enough for a reduced-scale decode)."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    folder = write_synthetic_ham10000(tmp_path_factory.mktemp("photos"), n_lesions_per_class=2,
                                      images_per_lesion=(1, 1), size=(600, 450), seed=3)
    return sorted(folder.rglob("*.jpg"))[:5]


def export_onnx(runner, ref: str, out: Path) -> dict:
    result = invoke(runner, "export", ref, "--format", "onnx", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def dermcam_outputs(ref: str, photos: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cache pixels, logits, calibrated probabilities) the way evaluate and explain compute them."""
    import torch

    from dermcam.data.geometry import cache_size, model_input
    from dermcam.data.images import decode_image
    from dermcam.evaluate.operating import model_outputs
    from dermcam.store.inference import load_for_inference

    model, side = load_for_inference(ref)
    pixels = np.stack([decode_image(p, cache_size(side["preprocessing"]))[0] for p in photos])
    with torch.no_grad():
        logits = model(torch.stack([model_input(p, side["preprocessing"]) for p in pixels]))
    return pixels, logits.numpy(), model_outputs(logits.softmax(1).numpy(), side).probs


@pytest.mark.parametrize("calibration", [None, "temperature", "vector"])
def test_onnx_runtime_matches_pytorch_for_batches_of_1_and_5(runner, tmp_path: Path, photos: list[Path],
                                                             calibration: str | None) -> None:
    import onnxruntime

    ref = make_checkpoint("onx001", calibration)
    out = tmp_path / "model.onnx"
    result = export_onnx(runner, ref, out)
    assert result["format"] == "onnx" and result["check_gap"] <= 1e-4 and Path(result["file"]) == out

    pixels, logits, probs = dermcam_outputs(ref, photos)
    raw = np.exp(logits - logits.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    assert raw.max(axis=1).min() > 0.5  # far from uniform, so the comparison means something
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    one = session.run(None, {"image": pixels[:1]})
    five = session.run(None, {"image": pixels})
    assert np.abs(one[1] - probs[:1]).max() < 1e-4 and np.abs(one[0] - logits[:1]).max() < 1e-4
    assert np.abs(five[1] - probs).max() < 1e-4 and np.abs(five[0] - logits).max() < 1e-4
    assert (np.abs(raw - probs).max() > 1e-2) == bool(calibration)  # the graph applied the calibration


def test_metadata_round_trips_and_the_export_is_recorded(runner, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    from dermcam.store.references import resolve

    ref = make_checkpoint("onx002", "vector")
    out = Path(export_onnx(runner, ref, tmp_path)["file"])  # a folder: the default name
    assert out.name == "dermcam-test_efficientnet-onx002-e0.onnx"
    side = resolve(ref).sidecar
    meta = json.loads(onnxruntime.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["dermcam"])
    assert meta["schema"] == "dermcam.onnx/1" and meta["dtype"] == "float32"
    for key in ("backbone", "classes", "label_encoding", "calibration", "operating_point", "metrics", "config"):
        assert meta[key] == side[key], key
    assert meta["preprocessing"] == side["preprocessing"]
    assert meta["source"]["id"] == ref and meta["source"]["sha256"] == side["weights"]["sha256"]
    assert meta["graph"]["input"]["shape"] == ["batch", 48, 64, 3]

    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 48, 64, 3]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]

    row = next(r for r in list_json(runner) if r["id"] == ref)
    assert "exported" in row["flags"] and row["exports"][0]["format"] == "onnx"
    again = invoke(runner, "export", ref, "--format", "onnx", "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_option_errors_and_a_missing_onnx_package_are_one_line(runner, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ref = make_checkpoint("onx003", None)
    half = invoke(runner, "export", ref, "--format", "onnx", "--half", "-o", str(tmp_path / "m.onnx"))
    assert half.exit_code == 2 and "float32" in half.stderr and half.stderr.count("\n") == 1
    unknown = invoke(runner, "export", ref, "--format", "tflite")
    assert unknown.exit_code == 2 and "safetensors or onnx" in unknown.stderr
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    missing = invoke(runner, "export", ref, "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.startswith("Error: ") and missing.stderr.count("\n") == 1
    assert "pip install 'dermcam[onnx]'" in missing.stderr and "Traceback" not in missing.output
    assert not list(tmp_path.iterdir())


def docs_snippet() -> str:
    """The code block of docs/checkpoints.md that runs an exported ONNX model with onnxruntime."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    matching = [b for b in blocks if "onnxruntime.InferenceSession" in b]
    assert len(matching) == 1, "docs/checkpoints.md should hold exactly one onnxruntime snippet"
    return matching[0]


# Runs the snippet where dermcam cannot be imported: no path that holds the package (the editable
# install adds src/), checked with find_spec before, and no dermcam module loaded after.
WITHOUT_DERMCAM = """
import importlib.util, os, sys
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "dermcam"))]
assert importlib.util.find_spec("dermcam") is None
exec(compile(open("snippet.py").read(), "snippet.py", "exec"))
assert not [m for m in sys.modules if m.split(".")[0] == "dermcam"]
"""


def test_the_docs_snippet_runs_without_dermcam_and_agrees(runner, tmp_path: Path, photos: list[Path]) -> None:
    ref = make_checkpoint("onx004", "temperature")
    export_onnx(runner, ref, tmp_path / "model.onnx")
    (tmp_path / "lesion.jpg").write_bytes(photos[0].read_bytes())
    (tmp_path / "snippet.py").write_text(docs_snippet())
    proc = subprocess.run([sys.executable, "-I", "-c", WITHOUT_DERMCAM], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    printed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the snippet prints {class: probability}
    expected = dermcam_outputs(ref, photos[:1])[2][0]
    assert list(printed) == CLASSES
    assert np.abs(np.array(list(printed.values())) - expected).max() <= 1e-4 + 5e-5  # printed rounded to 4 places


def test_export_help_names_the_format(runner) -> None:
    result = runner.invoke(app, ["ckpt", "export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--format" in result.output and "onnx" in result.output
