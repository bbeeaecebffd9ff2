"""Calibration (temperature scaling on val) and operating points: the math on synthetic probabilities,
then every command through the CLI on a deliberately over-confident tiny model."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_json
from dermcam.cli import app
from dermcam.errors import BadInputError, CorruptError
from dermcam.evaluate import calibration
from dermcam.evaluate.operating import choose, decide, parse_operating_point
from dermcam.store import schema as s
from dermcam.store.checkpoint import SIDECAR
from test_export import export, with_meta
from test_same_answer import saved_checkpoint

CLASSES = ["bkl", "mel", "nv"]
TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "1"]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sampled(n: int, seed: int = 0, sharpen: float = 1.0, shift: np.ndarray | None = None):
    """Labels drawn from softmax(z) (so softmax(z) is calibrated), and probabilities softmax(sharpen * z
    + shift): over-confident for sharpen > 1, prior-shifted (like class-weighted training) with shift."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 2
    truth = _softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)).sum(axis=1)
    return y, _softmax(sharpen * z + (0 if shift is None else shift)), [f"lesion{i // 2}" for i in range(n)]


# ------------------------------------------------------------------------------------------ the math


def test_metrics_by_hand() -> None:
    y = np.array([0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0]])
    # both in the (0.867, 0.933] and (0.533, 0.6] bins: |1 - 0.9| and |0 - 0.6|, each half the images
    assert calibration.expected_calibration_error(y, probs) == pytest.approx((0.1 + 0.6) / 2)
    assert calibration.brier_score(y, probs) == pytest.approx(((0.01 + 0.01) + (0.36 + 0.36)) / 2)
    assert calibration.calibration_metrics(y, probs)["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4)) / 2,
                                                                             abs=1e-6)


def test_temperature_of_a_calibrated_model_is_about_one() -> None:
    y, probs, _ = _sampled(20_000)
    assert calibration.fit_temperature(y, probs) == pytest.approx(1.0, abs=0.05)


def test_temperature_fixes_an_over_confident_model() -> None:
    y, probs, groups = _sampled(5_000, sharpen=3.0)
    fitted = calibration.fit(y, probs, groups)
    assert fitted["method"] == "temperature" and fitted["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fitted["after"]["nll"] < fitted["before"]["nll"] - 0.2
    assert fitted["after"]["ece"] < fitted["before"]["ece"] / 4
    assert fitted["after"]["brier"] < fitted["before"]["brier"]
    scaled = calibration.apply(probs, {"calibration": fitted})
    assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()  # a temperature never changes the argmax
    assert calibration.apply(probs, {}) == pytest.approx(probs)  # no calibration: unchanged


def test_vector_scaling_is_kept_only_when_it_predicts_held_out_lesions_better() -> None:
    y, shifted, groups = _sampled(5_000, shift=np.array([0.0, 1.5, 0.0]))  # the prior shift of class weights
    assert calibration.fit(y, shifted, groups)["vector_check"] is None  # opt-in: a temperature by default
    fitted = calibration.fit(y, shifted, groups, vector=True)
    check = fitted["vector_check"]
    assert fitted["method"] == "vector" and check["kept"]
    assert all(v < t for v, t in zip(check["vector_nll"], check["temperature_nll"]))
    assert fitted["after"]["nll"] < fitted["before"]["nll"]
    y, sharp, groups = _sampled(5_000, sharpen=3.0)  # a pure scale problem: one number is enough
    assert calibration.fit(y, sharp, groups, vector=True)["method"] == "temperature"
    few = calibration.vector_check(y[:12], sharp[:12], groups[:12])  # 6 lesions: nothing to measure
    assert not few["kept"] and "too few" in few["note"]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spec", ["mel:sensitivity=0.9", "mel:sensitivity=0.73", "mel:specificity=0.8",
                                  "bkl:specificity=0.95"])
def test_the_threshold_reaches_its_target_and_goes_no_further(spec: str, seed: int) -> None:
    y, probs, _ = _sampled(300, seed=seed)
    wanted = parse_operating_point(spec)
    c = CLASSES.index(wanted.name)
    point = choose(probs[:, c], y == c, wanted)
    called = probs[:, c] >= point["threshold"]
    sensitivity, specificity = called[y == c].mean(), (~called[y != c]).mean()
    assert point["validation"]["sensitivity"] == pytest.approx(sensitivity)
    assert point["validation"]["specificity"] == pytest.approx(specificity)
    scores = np.unique(probs[:, c])
    assert not (scores == point["threshold"]).any()  # between two scores: last-bit noise flips no image
    if wanted.metric == "sensitivity":  # the highest threshold: leaving out the lowest score called misses it
        assert sensitivity >= wanted.target
        higher = scores[scores > point["threshold"]]
        assert not len(higher) or (probs[y == c, c] > higher[0]).mean() < wanted.target
    else:  # the lowest threshold: the next score down misses it
        assert specificity >= wanted.target
        lower = scores[scores < point["threshold"]]
        assert not len(lower) or (probs[y != c, c] < lower[-1]).mean() < wanted.target


def test_decision_rule() -> None:
    probs = np.array([[0.60, 0.30, 0.10],   # mel above 0.25: mel, although bkl is more probable
                      [0.10, 0.20, 0.70],   # mel below: the most probable other class, nv
                      [0.15, 0.80, 0.05],   # mel, as the argmax would say too
                      [0.50, 0.24, 0.26]])  # mel just below: bkl, the most probable of the others
    point = {"class": "mel", "threshold": 0.25}
    assert decide(probs, point, CLASSES).tolist() == [1, 2, 1, 0]
    assert decide(probs, None, CLASSES).tolist() == probs.argmax(axis=1).tolist()


@pytest.mark.parametrize("spec", ["mel:sens=2", "mel:sensitivity=2", "mel:sensitivity=0", "mel:specificity=1",
                                  "mel:specificity=-0.5", "mel:sensitivity=nan", "mel=0.9", "mel:recall=0.9", ""])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(BadInputError, match="CLASS:sensitivity=T"):
        parse_operating_point(spec)


SIDECAR_BASE = {"schema": "dermcam.checkpoint/1", "id": "abc123:0", "run_id": "abc123", "epoch": 0,
                "weights": {"file": "epoch-0000.safetensors", "sha256": "0" * 64}, "backbone": "test_efficientnet",
                "classes": CLASSES, "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.2] * 3}}
GOOD_CALIBRATION = {"method": "temperature", "temperature": 1.5}
GOOD_POINT = {"class": "mel", "metric": "sensitivity", "target": 0.9, "threshold": 0.23}


@pytest.mark.parametrize(("change", "field"), [
    ({"calibration": {"method": "temperature", "temperature": 0.0}}, "calibration.temperature"),
    ({"calibration": {"method": "temperature", "temperature": math.nan}}, "calibration.temperature"),
    ({"calibration": {"method": "temperature", "temperature": 100}}, "calibration.temperature"),
    ({"calibration": {"method": "platt", "temperature": 1.0}}, "calibration.method"),
    ({"calibration": {"method": "vector", "temperature": 1.0}}, "calibration.scale"),
    ({"calibration": {**GOOD_CALIBRATION, "scale": [1, 1, 1], "bias": [0, 0, 0]}}, "calibration.scale"),
    ({"calibration": {"method": "vector", "temperature": 1.0, "scale": [1, 1], "bias": [0, 0]}}, "calibration.scale"),
    ({"calibration": {"method": "vector", "temperature": 1.0, "scale": [1, 1, 1], "bias": [0, math.inf, 0]}},
     "calibration.bias[1]"),
    ({"calibration": GOOD_CALIBRATION, "operating_point": {**GOOD_POINT, "class": "akiec"}}, "operating_point.class"),
    ({"calibration": GOOD_CALIBRATION, "operating_point": {**GOOD_POINT, "threshold": 1.5}},
     "operating_point.threshold"),
    ({"calibration": GOOD_CALIBRATION, "operating_point": {**GOOD_POINT, "target": 1.0}}, "operating_point.target"),
    ({"operating_point": GOOD_POINT}, "operating_point"),
], ids=["zero-T", "nan-T", "huge-T", "method", "vector-without-scale", "temperature-with-scale", "short-scale",
        "inf-bias", "unknown-class", "threshold", "target", "point-without-calibration"])
def test_the_schema_refuses_what_would_change_an_answer(change: dict, field: str) -> None:
    s.validate({**SIDECAR_BASE, "calibration": GOOD_CALIBRATION, "operating_point": GOOD_POINT}, SIDECAR, "ok")
    with pytest.raises(CorruptError, match=re.escape(f"'{field}'")):
        s.validate({**SIDECAR_BASE, **change}, SIDECAR, "sidecar")


# ------------------------------------------------------------------------------- through the CLI


@pytest.fixture
def old_checkpoint(home: Path) -> str:
    """An over-confident random model for the synth set, saved without a calibration (as before)."""
    manifest = json.loads((home / "datasets" / "synth" / "manifest.json").read_text())
    return saved_checkpoint(manifest, sharpen=30.0, run_id="0ld000", input_size=[3, 48, 64])


def _sidecar(home: Path, ckpt: str) -> dict:
    run, epoch = ckpt.split(":")
    return json.loads((home / "runs" / run / f"epoch-{int(epoch):04d}.json").read_text())


def _cache_image(home: Path, folder: Path, count: int = 3) -> list[Path]:
    """The first ``count`` cached images of the synth set as PNG files, for explain."""
    from PIL import Image

    images = np.load(home / "datasets" / "synth" / "images.npy", mmap_mode="r")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        Image.fromarray(np.array(images[i])).save(folder / f"lesion{i}.png")
        paths.append(folder / f"lesion{i}.png")
    return paths


def test_calibrate_an_old_checkpoint_lowers_nll_and_ece(runner, home: Path, old_checkpoint: str) -> None:
    assert "calibration" not in _sidecar(home, old_checkpoint)
    result = run_json(runner, ["calibrate", old_checkpoint, "--json"])
    cal = result["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] > 2  # over-confident: spread out
    assert cal["after"]["nll"] < cal["before"]["nll"] and cal["after"]["ece"] < cal["before"]["ece"]
    assert cal["fitted_on"]["dataset"] == "synth" and cal["fitted_on"]["split"] == "val" and cal["fitted_on"]["n"] == 9
    assert cal["vector_check"] is None  # vector scaling is opt-in (--vector)
    vector = run_json(runner, ["calibrate", old_checkpoint, "--vector", "--json"])["calibration"]
    assert "too few" in vector["vector_check"]["note"]  # 6 val lesions: temperature only (measured, not assumed)
    cal = run_json(runner, ["calibrate", old_checkpoint, "--json"])["calibration"]
    assert _sidecar(home, old_checkpoint)["calibration"] == cal
    assert runner.invoke(app, ["ckpt", "verify"]).exit_code == 0  # the rewritten sidecar is a valid checkpoint
    shown = runner.invoke(app, ["calibrate", old_checkpoint])
    assert shown.exit_code == 0 and "before" in shown.stdout and "after" in shown.stdout, shown.output


def test_evaluate_reports_calibration_and_writes_the_plots(runner, home: Path, old_checkpoint: str,
                                                           tmp_path: Path) -> None:
    raw = run_json(runner, ["evaluate", old_checkpoint, "--json", "--resamples", "0", "-o", str(tmp_path / "raw")])
    assert raw["metrics"]["calibration"]["applied"] is False and "operating_point" not in raw["metrics"]
    run_json(runner, ["calibrate", old_checkpoint, "--json"])
    out = tmp_path / "report"
    result = run_json(runner, ["evaluate", old_checkpoint, "--json", "--resamples", "0", "-o", str(out)])
    cal = result["metrics"]["calibration"]
    assert cal["applied"] and cal["temperature"] > 2 and set(cal) >= {"ece", "brier", "nll", "raw"}
    assert cal["raw"] == raw["metrics"]["calibration"]["raw"]
    assert cal["nll"] < cal["raw"]["nll"]
    for name in ("reliability.png", "roc.png", "pr.png", "metrics.json", "predictions.csv"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text())["calibration"] == cal
    calibrated, uncalibrated = _predictions(out), _predictions(tmp_path / "raw")
    assert [r["predicted"] for r in calibrated] == [r["predicted"] for r in uncalibrated]  # same argmax
    assert max(abs(float(a["p_mel"]) - float(b["p_mel"])) for a, b in zip(calibrated, uncalibrated)) > 0.01
    again = run_json(runner, ["evaluate", old_checkpoint, "--json", "--resamples", "0", "--no-calibration"])
    assert again["metrics"]["calibration"] == raw["metrics"]["calibration"]
    shown = runner.invoke(app, ["evaluate", old_checkpoint, "--resamples", "0"])
    assert "raw -> calibrated" in shown.stdout, shown.output


def _predictions(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("spec", ["mel:sensitivity=0.6", "nv:specificity=0.8"])
def test_the_operating_point_reaches_its_validation_target(runner, home: Path, old_checkpoint: str,
                                                           tmp_path: Path, spec: str) -> None:
    point = run_json(runner, ["calibrate", old_checkpoint, "--operating-point", spec, "--json"])["operating_point"]
    wanted = parse_operating_point(spec)
    assert point["validation"][wanted.metric] >= wanted.target and point["validation"]["n"] == 9
    assert _sidecar(home, old_checkpoint)["operating_point"] == point
    out = tmp_path / "val"
    metrics = run_json(runner, ["evaluate", old_checkpoint, "--split", "val", "--json", "--resamples", "200",
                                "-o", str(out)])["metrics"]
    scored = metrics["operating_point"]
    assert scored[wanted.metric] == pytest.approx(point["validation"][wanted.metric])  # the same images
    assert scored[wanted.metric] >= wanted.target
    assert np.asarray(scored["confusion_matrix"]).sum() == scored["n"] == 9
    intervals = scored["ci"]["intervals"]  # 3 val images of each class: sensitivity may have none
    assert intervals["specificity"][0] <= scored["specificity"] <= intervals["specificity"][1]
    assert intervals["sensitivity"] is None or intervals["sensitivity"][0] <= scored["sensitivity"]
    rows = _predictions(out)
    expected = decide(np.array([[float(r[f"p_{k}"]) for k in CLASSES] for r in rows]), point, CLASSES)
    assert [r["decision"] for r in rows] == [CLASSES[i] for i in expected]
    assert (out / "confusion_matrix_operating_point.png").is_file()
    sensitivity = np.mean([r["decision"] == wanted.name for r in rows if r["true"] == wanted.name])
    assert scored["sensitivity"] == pytest.approx(sensitivity)


def test_explain_shows_calibrated_probabilities_and_the_decision(runner, home: Path, old_checkpoint: str,
                                                                 tmp_path: Path) -> None:
    images = _cache_image(home, tmp_path / "images")
    args = ["explain", *map(str, images), "-c", old_checkpoint, "-o", str(tmp_path / "out"), "--json"]
    raw = run_json(runner, [*args, "--csv", str(tmp_path / "raw.csv")])
    run_json(runner, ["calibrate", old_checkpoint, "--operating-point", "mel:sensitivity=0.6", "--json"])
    sidecar = _sidecar(home, old_checkpoint)
    point = sidecar["operating_point"]
    report = run_json(runner, [*args, "--csv", str(tmp_path / "calibrated.csv")])
    assert report["calibration"]["temperature"] == sidecar["calibration"]["temperature"]
    assert report["operating_point"]["threshold"] == point["threshold"]
    for before, after in zip(raw["images"], report["images"]):
        p_raw = np.array([before["probabilities"][c] for c in CLASSES])
        p_cal = np.array([after["probabilities"][c] for c in CLASSES])
        assert p_cal == pytest.approx(calibration.apply(p_raw[None], sidecar)[0], abs=1e-5)
        assert after["predicted"] == before["predicted"]  # a temperature keeps the argmax
        side = "above" if after["probabilities"]["mel"] >= point["threshold"] else "below"
        assert after["operating_point"] == f"mel: {side} threshold {point['threshold']:.3f}"
        assert after["decision"] == CLASSES[decide(p_cal[None], point, CLASSES)[0]]
        assert after["target"] == after["decision"]  # the overlay explains the decision
        written = json.loads(Path(after["sidecar"]).read_text())
        assert written["operating_point"] == after["operating_point"] and written["decision"] == after["decision"]
        assert before["operating_point"] is None and before["decision"] == before["predicted"]
    with open(tmp_path / "calibrated.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["operating_point"] for r in rows] == [r["operating_point"] for r in report["images"]]
    plain = run_json(runner, [*args, "--no-calibration"])
    assert plain["calibration"] is None and plain["operating_point"] is None
    assert [r["probabilities"] for r in plain["images"]] == [r["probabilities"] for r in raw["images"]]
    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0 and "temperature" in table.stdout, table.output
    assert f"p(mel) >= {point['threshold']:.3f}" in table.stdout and "decision" in table.stdout, table.output


def test_apply_is_the_one_path_of_every_command(runner, home: Path, old_checkpoint: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run_json(runner, ["calibrate", old_checkpoint, "--json"])
    fixed = np.array([0.2, 0.3, 0.5])
    monkeypatch.setattr(calibration, "apply", lambda probs, sidecar: np.tile(fixed, (len(probs), 1)))
    run_json(runner, ["evaluate", old_checkpoint, "--resamples", "0", "--json", "-o", str(tmp_path / "e")])
    assert {tuple(float(r[f"p_{c}"]) for c in CLASSES) for r in _predictions(tmp_path / "e")} == {tuple(fixed)}
    images = _cache_image(home, tmp_path / "images", count=2)
    report = run_json(runner, ["explain", *map(str, images), "-c", old_checkpoint, "--no-cam", "--json",
                               "-o", str(tmp_path / "x")])
    assert {tuple(r["probabilities"][c] for c in CLASSES) for r in report["images"]} == {tuple(fixed)}


@pytest.mark.parametrize("spec", ["mel:sens=2", "mel:sensitivity=1.5", "akiec:sensitivity=0.9", "mel"])
def test_bad_operating_points_are_one_line_errors_before_any_work(runner, home: Path, old_checkpoint: str,
                                                                  spec: str) -> None:
    before = _sidecar(home, old_checkpoint)
    for command in (["calibrate", old_checkpoint, "--operating-point", spec],
                    ["train", *TINY, "--operating-point", spec]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "operating-point" in result.stderr
    assert _sidecar(home, old_checkpoint) == before
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["0ld000"]  # train started no run


def test_calibrate_refuses_an_exported_file(runner, home: Path, old_checkpoint: str, tmp_path: Path) -> None:
    exported = export(runner, old_checkpoint, tmp_path / "m.safetensors")
    result = runner.invoke(app, ["calibrate", exported["file"]])
    assert result.exit_code == 2 and "ckpt restore" in result.stderr, result.output


def test_export_and_restore_keep_the_calibration(runner, home: Path, old_checkpoint: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run_json(runner, ["calibrate", old_checkpoint, "--operating-point", "mel:sensitivity=0.6", "--json"])
    sidecar = _sidecar(home, old_checkpoint)
    file = Path(export(runner, old_checkpoint, tmp_path / "m.safetensors")["file"])
    from dermcam.store.exported import read_header

    meta = read_header(file)[1]
    assert meta["calibration"] == sidecar["calibration"] and meta["operating_point"] == sidecar["operating_point"]
    images = _cache_image(home, tmp_path / "images", count=2)
    from_store, from_file = (run_json(runner, ["explain", *map(str, images), "-c", ref, "--no-cam", "--json",
                                               "-o", str(tmp_path / "x")])["images"]
                             for ref in (old_checkpoint, str(file)))
    assert [(r["probabilities"], r["decision"]) for r in from_store] == \
        [(r["probabilities"], r["decision"]) for r in from_file]
    bad = with_meta(file, tmp_path / "bad.safetensors",
                    calibration={"method": "temperature", "temperature": -1.0})
    refused = runner.invoke(app, ["ckpt", "restore", str(bad)])
    assert refused.exit_code == 4 and "'calibration.temperature'" in refused.stderr, refused.output
    elsewhere = tmp_path / "other-store"
    elsewhere.mkdir()
    monkeypatch.setenv("DERMCAM_HOME", str(elsewhere))
    restored = run_json(runner, ["ckpt", "restore", str(file), "--json"])
    imported = _sidecar(elsewhere, restored["id"])
    assert imported["calibration"] == sidecar["calibration"]
    assert imported["operating_point"] == sidecar["operating_point"]


def test_training_calibrates_its_best_checkpoint_and_chooses_the_operating_point(runner, home: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--operating-point", "mel:sensitivity=0.65", "--json"])
    best = _sidecar(home, result["best_checkpoint"])
    assert best["calibration"]["fitted_on"]["split"] == "val"
    assert best["operating_point"]["validation"]["sensitivity"] >= 0.65
    assert best["config"]["operating_point"] == "mel:sensitivity=0.65"
    test = result["test_metrics"]
    assert test["calibration"]["applied"]
    assert test["operating_point"]["threshold"] == best["operating_point"]["threshold"]
    report = Path(result["run_dir"]) / "report"
    for name in ("reliability.png", "roc.png", "pr.png", "confusion_matrix_operating_point.png"):
        assert (report / name).is_file(), name


def test_calibrate_waits_for_training_and_never_writes_over_replaced_weights(runner, home: Path,
                                                                             old_checkpoint: str) -> None:
    from dermcam.store.checkpoint import annotate_checkpoint, save_checkpoint
    from dermcam.store.locks import store_lock
    from dermcam.store.references import resolve

    with store_lock("run-0ld000"):  # what a training process of that run holds
        result = runner.invoke(app, ["calibrate", old_checkpoint])
    assert result.exit_code == 6 and "training right now" in result.stderr, result.output
    stale = resolve(old_checkpoint)
    weights = {k: v + 1 for k, v in stale.load_weights().items()}  # a rollback retrained this epoch meanwhile
    fresh = save_checkpoint(stale.run_dir, epoch=0, model_state=weights,
                            sidecar={k: v for k, v in stale.sidecar.items() if k in ("backbone", "classes",
                                                                                     "preprocessing", "dataset")})
    with pytest.raises(CorruptError, match="replaced while it was being calibrated"):
        annotate_checkpoint(stale, {"calibration": GOOD_CALIBRATION})
    assert _sidecar(home, old_checkpoint) == fresh.sidecar
