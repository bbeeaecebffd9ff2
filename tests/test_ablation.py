"""Issue #24's ablation (benchmarks/ablation_cv_fold.py) and the paired bootstrap it reads: the difference of
two models on the same images, both measured on each resample of one draw of lesion groups."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dermcam.evaluate.bootstrap import confidence_intervals, group_weights, paired_intervals, weighted_metrics
from test_benchmarks import run_smoke

CLASSES = ["bkl", "mel", "nv"]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _predictions(n: int, seed: int, boost: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += boost
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_a_model_against_itself_differs_by_exactly_zero() -> None:
    y, probs = _predictions(200, seed=0, boost=1.0)
    groups = [str(i // 2) for i in range(len(y))]
    ci = paired_intervals(y, probs, probs.copy(), groups, CLASSES, resamples=100).ci
    for key in ("balanced_accuracy", "macro_f1", "auc_macro", "recall_mel"):
        assert ci[key] == [0.0, 0.0], key


def test_the_difference_is_measured_on_the_same_resamples_for_both_models() -> None:
    y, a = _predictions(300, seed=1, boost=0.5)
    b = a.copy()
    b[np.arange(len(y)), y] += 0.02  # b: the same predictions, a little surer of the truth
    b /= b.sum(1, keepdims=True)
    groups = [f"lesion{i // 3}" for i in range(len(y))]
    paired = paired_intervals(y, a, b, groups, CLASSES, resamples=300, seed=4)
    weights = group_weights(groups, 300, seed=4)
    by_hand = (weighted_metrics(y, b, weights, CLASSES)["auc_macro"]
               - weighted_metrics(y, a, weights, CLASSES)["auc_macro"])
    assert paired.ci["auc_macro"] == pytest.approx(list(np.percentile(by_hand, [2.5, 97.5])), abs=1e-6)
    assert paired.ci["auc_macro"][0] > 0  # better on every image: better on every resample
    # the separate intervals overlap although the paired one excludes 0: why the ablation pairs
    alone_a = confidence_intervals(y, a, groups, CLASSES, resamples=300, seed=4).ci["auc_macro"]
    alone_b = confidence_intervals(y, b, groups, CLASSES, resamples=300, seed=4).ci["auc_macro"]
    assert alone_b[0] < alone_a[1]


def test_paired_intervals_refuse_predictions_of_different_images() -> None:
    y, probs = _predictions(20, seed=2, boost=1.0)
    with pytest.raises(ValueError):
        paired_intervals(y, probs, probs[:10], [str(i) for i in range(20)], CLASSES, resamples=10)


def test_the_ablation_runs_on_the_recipes_fold_0_in_smoke_mode(tmp_path: Path) -> None:
    """A 2-fold cross-validation with the recipe's smoke settings, both variants trained on its fold 0,
    scored on the same held-out images with paired intervals; a second ablation reuses every run. It
    writes no results."""
    record = run_smoke("ablation_cv_fold.py", "ablation_cv_fold.json", tmp_path)
    rows = record["rows"]
    assert [r["variant"] for r in rows] == ["full recipe", "no-metadata", "no-color-constancy"]
    assert [r["trained"] for r in rows] == ["recipe (reused)", "now", "now"]
    assert rows[0]["metadata"] == "age,sex,site" and rows[0]["color_constancy"] == "shades-of-gray"
    assert rows[1]["metadata"] is None and rows[1]["color_constancy"] == "shades-of-gray"
    assert rows[2]["color_constancy"] == "none" and rows[2]["metadata"] == "age,sex,site"
    assert len({r["run"] for r in rows}) == 3 and record["test_split_read"] is False
    assert record["options_source"] == "cross-validation record cv:cv-lite" and record["options"]["folds"] == 2
    for row in rows:
        assert row["images"] == record["images"] > 0 and 0.0 <= row["balanced_accuracy"] <= 1.0, row
        assert row["epochs"] == 1 and row["epoch_min"] >= 0, row
    assert rows[0]["d_balanced_accuracy"] == 0.0 and rows[0]["wall_min"] is None
    for row in rows[1:]:
        assert row["d_balanced_accuracy"] == pytest.approx(row["balanced_accuracy"] - rows[0]["balanced_accuracy"],
                                                           abs=1e-6)
        assert row["wall_min"] > 0 and row["reading"]
    assert any("stored out-of-fold" in note for note in record["notes"])


def _ablation(monkeypatch: pytest.MonkeyPatch, home: Path):  # type: ignore[no-untyped-def]
    """The benchmark script as a module, with DERMCAM_HOME restored after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("DERMCAM_HOME", str(home))
    import ablation_cv_fold

    return ablation_cv_fold


def test_without_the_recipes_cross_validation_the_ablation_stops_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "ablation_cv_fold.py"), "--home", str(tmp_path / "home")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 1
    assert "accuracy_cv_ham10000_lite.py first" in proc.stderr and "--fallback-defaults" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_the_recipes_results_json_must_agree_with_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ablation = _ablation(monkeypatch, tmp_path / "home")
    results = tmp_path / "accuracy_cv_ham10000_lite.json"
    config = {"dataset": "ham10000-lite", "folds": 5, "metadata": "age,sex,site", "epochs": 8}
    assert "not written yet" in ablation.check_recipe_results(results, tmp_path / "home", "cv-lite", config)
    ran = {"config": {"home": str(tmp_path / "home"), "name": "cv-lite"}, "options": {"folds": 5, "epochs": 8}}
    results.write_text(json.dumps(ran))
    assert "agree" in ablation.check_recipe_results(results, tmp_path / "home", "cv-lite", config)
    assert "not compared" in ablation.check_recipe_results(results, tmp_path / "other", "cv-lite", config)
    results.write_text(json.dumps({**ran, "options": {"folds": 5, "epochs": 12}}))
    with pytest.raises(SystemExit, match="other options"):
        ablation.check_recipe_results(results, tmp_path / "home", "cv-lite", config)


def test_fallback_defaults_train_the_full_recipes_fold_0_as_well(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No cross-validation in the store: the recipe's options (here shrunk to a tiny model), fold 0 of the
    full recipe trained next to the variant, both scored on fold 0 of the recomputed split."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    ablation = _ablation(monkeypatch, tmp_path / "home")
    source = write_synthetic_ham10000(tmp_path / "src", n_lesions_per_class=12)
    tiny = {"dataset": "ham10000-lite", "backbone": "test_efficientnet", "pretrained": "none", "image_size": "48x36",
            "epochs": 1, "batch_size": 8, "seed": 0, "patience": 99, "folds": 2, "color_constancy": "shades-of-gray",
            "metadata": "age,sex,site"}
    monkeypatch.setattr(ablation.recipe, "train_options", lambda args: dict(tiny))
    args = ablation.build_parser().parse_args(["--home", str(tmp_path / "home"), "--source", str(source),
                                               "--fallback-defaults", "--variant", "no-color-constancy",
                                               "--resamples", "50"])
    record = ablation.run(args, results=None)
    rows = record["rows"]
    assert [(r["variant"], r["trained"]) for r in rows] == [("full recipe", "now"), ("no-color-constancy", "now")]
    assert record["cv"] is None and "fallback" in record["options_source"]
    assert rows[0]["images"] == rows[1]["images"] == record["images"] > 0
