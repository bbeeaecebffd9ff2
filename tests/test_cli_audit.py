"""``dermcam audit`` through the CLI, on one tiny trained run (a synthetic set, one epoch of a tiny timm model,
calibrated, with an operating point): its options, its files, its report section and its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_json
from test_report import Page, needs_chromium, open_in_chromium


@pytest.fixture(scope="module")
def store(prepared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'synth' with one finished run; 'other' (external, test split only); 'square' (cached at 48x48)."""
    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import train

    root = tmp_path_factory.mktemp("audit-home")
    shutil.copytree(prepared_store / "datasets", root / "datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMCAM_HOME", str(root))
        src = write_synthetic_ham10000(root.parent / "audit-src", n_lesions_per_class=3, images_per_lesion=(1, 1),
                                       classes=("bcc", "mel", "nv"), size=(64, 48), seed=5)
        prepare(src, name="other", classes=["bcc", "mel", "nv"], cache_size=(64, 48), external=True, root=root)
        prepare(src, name="square", classes=["bcc", "mel", "nv"], cache_size=(48, 48), external=True, root=root)
        train(TrainConfig(dataset="synth", backbone="test_efficientnet", pretrained="none", image_size=48,
                          batch_size=16, epochs=1, operating_point="mel:sensitivity=0.9"), root=root)
    return root


@pytest.fixture
def home(store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DERMCAM_HOME", str(store))
    return store


def run_dir(store: Path) -> Path:
    [run] = sorted((store / "runs").iterdir())
    return run


def invoke(runner, *args: str, columns: int = 200):
    from dermcam.cli import app

    return runner.invoke(app, ["audit", *map(str, args)], env={"COLUMNS": str(columns)})


def test_audit_of_the_best_checkpoint_writes_beside_its_report_and_the_page_shows_it(runner, home: Path) -> None:
    run = run_dir(home)
    out = run_json(runner, ["audit", "--limit", "6", "-p", "ink", "--perturbation", "rot90", "--json"])
    assert out["n"] == 6 and out["limit"] == 6 and out["available"] > 6
    assert out["dataset"] == "synth" and out["split"] == "test" and out["seed"] == 0
    assert out["checkpoint"]["id"] == json.loads((run / "run.json").read_text())["best"]
    assert out["out_dir"] == str(run / "report") and out["positive_class"] == "mel"
    assert out["operating_point"]["class"] == "mel" and out["calibration"]["method"]
    assert [p["name"] for p in out["stress"]["perturbations"]] == ["ink", "rot90"]
    assert len(out["attention"]["images"]) == 6 and out["findings"]
    saved = json.loads((run / "report" / "audit.json").read_text())
    assert saved["schema"] == "dermcam.audit/1" and saved["findings"] == out["findings"]
    assert {k for k in ("attention", "stress", "versions", "examples")} <= set(saved)
    assert str(run / "report" / "report.html") in out["files"]
    page = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert 'id="shortcuts"' in page and "What changes the answer" in page and "Where the attention goes" in page


@needs_chromium
def test_the_report_section_renders_offline_in_a_browser(runner, home: Path, tmp_path: Path) -> None:
    """The section's charts and example images decode in headless Chromium with the page's own CSP, and
    nothing asks the network (the report check of test_report, on a page with an audit section)."""
    run_json(runner, ["audit", "--limit", "6", "-p", "ink", "-p", "vignette", "--json"])
    page = run_dir(home) / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    section = text[text.index('id="shortcuts"'):]
    assert section.count("<img") >= 2  # a chart and the example images with their CAM
    images, broken, console = open_in_chromium(page, tmp_path)
    assert images == len(Page(text).images) and broken == 0 and console == []


def test_the_table_fits_80_columns_and_says_stable_or_not(runner, home: Path, tmp_path: Path) -> None:
    result = invoke(runner, "--limit", "4", "--out", tmp_path, columns=80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert "Where the attention goes" in result.stdout and "What changes the answer" in result.stdout
    for name in ("more_contrast", "less_contrast", "half_res", "jpeg30"):  # names whole, never cut
        assert any(line.split()[:1] == [name] for line in lines), name
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in ("hflip", "rot90", "blur")]
    assert len(rows) == 3 and all(any(word in line for word in ("stable", "raises", "lowers", "clear", "moves"))
                                  for line in rows), result.stdout
    assert f"Audit: {tmp_path / 'audit.json'}" in result.stdout
    assert not (tmp_path / "report.html").exists()  # no evaluation in that folder: no page is written


def test_every_option_and_a_deterministic_result(runner, home: Path, tmp_path: Path) -> None:
    run = run_dir(home)
    args = [run.name, "--data", "synth", "--split", "val", "--limit", "5", "--seed", "2", "--batch-size", "3",
            "--threads", "1", "--device", "cpu", "--json"]
    stress = [*args, "-p", "hflip", "-p", "ink", "--only", "stress"]
    one = run_json(runner, ["audit", *stress, "--out", str(tmp_path / "a")])
    two = run_json(runner, ["audit", *stress, "--out", str(tmp_path / "b")])
    assert one["split"] == "val" and one["n"] == 5 and one["seed"] == 2 and one["attention"] is None
    assert one["parts"] == ["stress"] and [p["name"] for p in one["stress"]["perturbations"]] == ["ink", "hflip"]
    assert one["stress"] == {**two["stress"], "seconds": one["stress"]["seconds"]}
    assert (tmp_path / "a" / "audit.json").is_file() and (tmp_path / "a" / "audit" / "stress.png").is_file()
    attention = run_json(runner, ["audit", *args, "--only", "attention", "--out", str(tmp_path / "c")])
    assert attention["stress"] is None and len(attention["attention"]["images"]) == 5


def test_the_baseline_is_what_evaluate_reports_for_the_same_rows(home: Path, tmp_path: Path) -> None:
    import pandas as pd

    from dermcam.audit.run import audit
    from dermcam.evaluate.evaluation import evaluate

    evaluate(None, resamples=0, out_dir=tmp_path / "eval", threads=None)
    result = audit(None, parts=("stress",), perturbations=["hflip"], out_dir=tmp_path / "audit", batch_size=64)
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"image_id": str})
    assert list(predictions["image_id"]) == result.image_ids
    probs = predictions[[f"p_{c}" for c in result.classes]].to_numpy()
    np.testing.assert_allclose(result.baseline.probs, probs, atol=2e-6)
    assert list(predictions["decision"]) == [result.classes[d] for d in result.baseline.decisions]


@pytest.mark.parametrize("args, code, message", [
    (["--limit", "0"], 2, "--limit must be a whole number of at least 1, not 0"),
    (["-p", "sepia"], 2, "unknown perturbation 'sepia'; choose from ink, ruler"),
    (["--only", "colour"], 2, "--only 'colour': choose attention or stress"),
    (["--split", "holdout"], 2, "--split must be train, val or test"),
    (["--data", "other", "--split", "train"], 2, "split 'train' of data set 'other' has no image"),
    (["--data", "nosuchset"], 3, "no prepared data set named 'nosuchset'"),
    (["nosuchrun:0"], 3, "nosuchrun"),
])
def test_bad_input_is_one_line_and_a_documented_exit_code(runner, home: Path, tmp_path: Path, args: list[str],
                                                         code: int, message: str) -> None:
    result = invoke(runner, *args, "--out", tmp_path / "out")
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_cam_layer_is_one_line_and_stress_still_runs(runner, home: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dermcam.errors import NotFoundError
    from dermcam.models import layers

    def none(model):
        raise NotFoundError(f"{type(model).__name__} has no layer producing a spatial (B, C, H, W) feature map")

    monkeypatch.setattr(layers, "find_target_layer", none)
    result = invoke(runner, "--limit", "3", "--out", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr.count("\n") == 1 and "cannot audit where the model looks" in result.stderr
    assert "--only stress" in result.stderr
    ok = invoke(runner, "--limit", "3", "--only", "stress", "-p", "blur", "--out", tmp_path / "out")
    assert ok.exit_code == 0, ok.output


def test_a_set_cached_at_another_size_is_audited_as_evaluate_scores_it_with_a_warning(runner, home: Path,
                                                                                     tmp_path: Path) -> None:
    result = invoke(runner, "--data", "square", "--limit", "3", "-p", "hflip", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert any("caches 48x48 images, the model was trained on 64x48" in w and "--cache-size 64x48" in w
               for w in warnings), result.stderr
    assert json.loads(result.stdout)["dataset"] == "square"


def test_the_help_names_every_perturbation(runner) -> None:
    from dermcam.audit.perturb import PERTURBATIONS
    from dermcam.cli.audit import PERTURBATION_HELP

    assert PERTURBATION_HELP.split(", ") == list(PERTURBATIONS)


def test_audit_compile_that_fails_falls_back_once_with_the_same_answers(runner, home: Path, monkeypatch,
                                                                         tmp_path: Path) -> None:
    """`audit --compile` where torch.compile fails at its first call: the same audit as without it, one
    warning, and no second attempt for the other perturbations (each would cost a failed compile)."""
    import torch

    args = ["audit", "--limit", "6", "--only", "stress", "-p", "ink", "-p", "rot90", "--json"]
    plain = run_json(runner, [*args, "--out", str(tmp_path / "plain")])
    calls: list[int] = []

    class Fails(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("backend='inductor' raised: CppCompileError: no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(1) or Fails(module))
    fallback = run_json(runner, [*args, "--compile", "--out", str(tmp_path / "compiled")])
    assert len(calls) == 1
    assert [w for w in fallback["warnings"] if "--compile" in w] == [
        "--compile failed, running eagerly: RuntimeError: backend='inductor' raised: CppCompileError: "
        "no C++ compiler (simulated)"]
    assert {**fallback["stress"], "seconds": 0} == {**plain["stress"], "seconds": 0}
