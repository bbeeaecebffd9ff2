"""External validation: evaluate on another prepared set, bootstrap intervals over lesions, subgroups."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_json
from dermcam.cli import app
from dermcam.evaluate.bootstrap import confidence_intervals, group_weights, weighted_metrics
from dermcam.evaluate.metrics import compute_metrics
from dermcam.evaluate.subgroups import age_band, subgroup_metrics

CLASSES = ["bkl", "mel", "nv"]
TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "1"]
HEADLINE = ("balanced_accuracy", "macro_f1", "auc_macro", "recall_mel", "precision_mel", "auc_mel")


def _predictions(n: int, seed: int = 0, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(probs, 2) if ties else probs


def test_weighted_metrics_with_unit_weights_are_the_plain_metrics() -> None:
    y, probs = _predictions(500)
    fast = weighted_metrics(y, probs, np.ones((1, len(y))), CLASSES)
    plain = compute_metrics(y, probs, CLASSES)
    for key in HEADLINE:
        assert fast[key][0] == pytest.approx(plain[key], abs=1e-12), key


def test_a_weighted_resample_equals_the_metrics_of_the_repeated_images() -> None:
    y, probs = _predictions(300, seed=1)
    groups = [f"lesion{i // 3}" for i in range(len(y))]
    weights = group_weights(groups, 4, seed=2)
    for row in weights:
        picked = np.repeat(np.arange(len(y)), row.astype(int))
        repeated = compute_metrics(y[picked], probs[picked], CLASSES)
        fast = weighted_metrics(y, probs, row[None], CLASSES)
        for key in HEADLINE:
            assert fast[key][0] == pytest.approx(repeated[key], abs=1e-12), key


def test_resamples_draw_whole_lesions() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c", "d"])
    weights = group_weights(groups, 200, seed=0)
    for name in set(groups):
        members = weights[:, groups == name]
        assert (members == members[:, :1]).all()  # all images of a lesion count equally often
    assert (weights.sum(axis=1) > 0).all() and weights[:, groups == "a"].any()


def test_intervals_hold_the_estimate_and_shrink_with_more_lesions() -> None:
    widths = []
    for n in (200, 3200):
        y, probs = _predictions(n, seed=3, ties=False)
        ci = confidence_intervals(y, probs, [str(i // 2) for i in range(n)], CLASSES, resamples=400, seed=0)
        value = compute_metrics(y, probs, CLASSES)["balanced_accuracy"]
        low, high = ci.ci["balanced_accuracy"]
        assert low <= value <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the lesions: about a quarter of the width


def test_subgroups_report_small_groups_instead_of_numbers() -> None:
    y, probs = _predictions(100, seed=4)
    index = pd.DataFrame({"sex": ["female"] * 70 + ["male"] * 25 + [""] * 5,
                          "age": ["47.0"] * 50 + ["80"] * 50, "localization": ["back"] * 100})
    entries = subgroup_metrics(y, probs, index, [str(i) for i in range(100)], CLASSES, resamples=50)
    by_name = {(e["column"], e["value"]): e for e in entries}
    assert set(by_name) == {("sex", "female"), ("sex", "male"), ("age", "45-59"), ("age", "75+")}  # one site only
    assert by_name[("sex", "male")]["n"] == 25 and "too few" in by_name[("sex", "male")]["note"]
    female = by_name[("sex", "female")]
    assert female["metrics"]["balanced_accuracy"] == pytest.approx(
        compute_metrics(y[:70], probs[:70], CLASSES)["balanced_accuracy"])
    assert female["ci"]["balanced_accuracy"] is not None
    assert age_band("29.9") == "<30" and age_band("nan") == "" and age_band("unknown") == ""


def test_subgroups_order_age_bands_and_leave_an_absent_class_without_recall() -> None:
    """Age bands youngest first (not '<30' after '75+'); a class with no image in a subgroup has no
    recall (None, no interval), never a 0 that reads as a failure."""
    y, probs = _predictions(160, seed=5)
    y[:40] = np.where(y[:40] == 0, 2, y[:40])  # no bkl among the youngest
    index = pd.DataFrame({"age": ["20"] * 40 + ["50"] * 40 + ["80"] * 40 + ["35"] * 40})
    entries = subgroup_metrics(y, probs, index, [str(i) for i in range(160)], CLASSES, resamples=50)
    assert [e["value"] for e in entries] == ["<30", "30-44", "45-59", "75+"]
    young = entries[0]
    assert young["metrics"]["recall_bkl"] is None and young["ci"]["recall_bkl"] is None
    assert young["metrics"]["recall_mel"] is not None and young["ci"]["recall_nv"] is not None


def test_the_subgroup_table_fits_80_columns_and_says_where_the_intervals_are() -> None:
    from rich.console import Console

    from dermcam.cli.views import subgroup_table

    y, probs = _predictions(200, seed=6)
    index = pd.DataFrame({"sex": ["female"] * 100 + ["male"] * 90 + ["female"] * 10,
                          "localization": ["lower extremity"] * 120 + ["acral"] * 10 + ["back"] * 70})
    entries = subgroup_metrics(y, probs, index, [str(i) for i in range(200)], CLASSES, resamples=50)
    for width, intervals in ((80, False), (160, True)):
        console = Console(width=width, record=True, color_system=None)
        console.print(subgroup_table(entries, CLASSES, width))
        text = console.export_text()
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width
        assert "lower extremity" in text and "…" not in text  # nothing cut short
        assert ("(0." in text) is intervals and ("--json" in text) is not intervals
        acral = next(line for line in text.splitlines() if "acral" in line)
        assert acral.split()[1:] == ["10", *["-"] * 6] and "fewer than 30" in text


@pytest.fixture
def other_set(runner, home: Path, tmp_path: Path) -> str:
    """A second prepared set, lesion-disjoint from 'synth', with one class the model lacks (bcc)."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(tmp_path / "other", n_lesions_per_class=24, images_per_lesion=(1, 2),
                                   classes=("bcc", "mel", "nv"), size=(64, 48), seed=9)
    result = runner.invoke(app, ["prepare", str(src), "--name", "other", "--classes", "bcc,mel,nv",
                                 "--cache-size", "64x48"])
    assert result.exit_code == 0, result.output
    return "other"


def test_evaluate_on_another_set_matches_classes_by_name(runner, home: Path, other_set: str, tmp_path: Path) -> None:
    [trained] = run_json(runner, ["train", *TINY, "--json"])
    out = run_json(runner, ["evaluate", trained["best_checkpoint"], "--data", other_set, "--resamples", "200",
                            "--out", str(tmp_path / "rep"), "--json"])
    assert out["trained_on"] == "synth" and out["dataset"] == "other"
    assert out["scored_classes"] == ["mel", "nv"] and out["left_out"]["bcc"] > 0
    assert out["metrics"]["support_bkl"] == 0 and out["metrics"]["recall_bkl"] == 0.0
    intervals = out["metrics"]["ci"]["intervals"]
    assert out["metrics"]["ci"]["resamples"] == 200 and out["metrics"]["ci"]["unit"] == "lesion"
    for key in ("balanced_accuracy", "macro_f1", "recall_mel", "auc_macro"):
        low, high = intervals[key]
        assert low <= out["metrics"][key] <= high
    with open(tmp_path / "rep" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == out["metrics"]["n"] and {r["true"] for r in rows} <= {"mel", "nv"}
    assert list(rows[0]) == ["image_id", "lesion_id", "true", "predicted", "p_bkl", "p_mel", "p_nv"]
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["dataset"] == "other" and saved["trained_on"] == "synth" and saved["ci"]["intervals"]
    human = runner.invoke(app, ["evaluate", trained["best_checkpoint"], "--data", other_set], env={"COLUMNS": "160"})
    assert human.exit_code == 0 and "trained on synth" in human.stdout and "left out" in human.stderr


def test_a_set_sharing_no_class_is_a_clear_error(runner, home: Path, tmp_path: Path) -> None:
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(tmp_path / "none", n_lesions_per_class=4, classes=("akiec", "bcc"),
                                   size=(64, 48), seed=5)
    assert runner.invoke(app, ["prepare", str(src), "--name", "disjoint", "--classes", "akiec,bcc",
                               "--cache-size", "64x48"]).exit_code == 0
    run_json(runner, ["train", *TINY, "--json"])
    result = runner.invoke(app, ["evaluate", "--data", "disjoint"])
    assert result.exit_code == 2 and "shares no class" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("value", ["-1", "x"])
def test_bad_resamples_are_refused(runner, home: Path, value: str) -> None:
    result = runner.invoke(app, ["evaluate", "--resamples", value])
    assert result.exit_code == 2


@pytest.mark.parametrize("layout", ["isic", "folders"])
def test_external_sets_in_other_layouts_evaluate_end_to_end(runner, home: Path, tmp_path: Path, layout: str) -> None:
    """A model trained on HAM-style 'synth' scored on an ISIC one-hot set (with classes it lacks) and on a
    folder-per-class set with a mistyped class folder, both prepared with --external."""
    from test_layouts import class_folders, isic_one_hot

    src = (isic_one_hot(tmp_path / "isic") if layout == "isic"
           else class_folders(tmp_path / "folders", {"mel": 6, "nv": 6, "mle": 3}))
    keep_all = ["--classes", "mel,nv,bkl,scc,akiec"] if layout == "isic" else []  # else the default choice
    prepared = runner.invoke(app, ["prepare", str(src), "--name", "ext", "--external", *keep_all, "--json"])
    assert prepared.exit_code in (0, 5), prepared.output  # 5: listed skips (ISIC's ambiguous rows)
    [trained] = run_json(runner, ["train", *TINY, "--json"])
    out = run_json(runner, ["evaluate", trained["best_checkpoint"], "--data", "ext", "--resamples", "100", "--json"])
    assert out["dataset"] == "ext" and out["trained_on"] == "synth" and out["split"] == "test"
    if layout == "isic":  # SCC and AK are classes the model does not know: counted, left out
        assert out["left_out"] == {"akiec": 2, "scc": 2} and out["scored_classes"] == ["bkl", "mel", "nv"]
        assert out["metrics"]["n"] == 18
    else:  # --classes defaulted to every class found; 'mle' is not the model's: left out, not mistaken for mel
        assert out["left_out"] == {"mle": 3} and out["scored_classes"] == ["mel", "nv"]
        assert out["metrics"]["n"] == 12 and out["metrics"]["support_bkl"] == 0
