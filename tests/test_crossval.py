"""Cross-validation, ``dermcam train --folds K``: grouped and stratified folds, a CV run through the CLI
(K fold runs, out-of-fold predictions over every train+val image and no test image, ``evaluate cv:NAME``,
the folds' ensemble on test), an interrupted CV that continues without retraining a finished fold, and
every refusal as one line before any work."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_json
from dermcam.errors import BadInputError, ExitCode
from helpers_cli import cli, refused

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]


def oof_rows(home: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(home / "crossval" / name / "oof.csv", dtype={"image_id": str, "group": str})


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- the folds


def test_folds_are_grouped_stratified_and_seeded() -> None:
    """A near-duplicate pair of two lesions becomes one group (group_keys), and a group never spans two
    folds; every class is in every fold, folds are of nearly equal size, and the seed alone decides."""
    from dermcam.data.split import assign_folds, group_keys

    rng = np.random.default_rng(0)
    rows = []
    for c, label in enumerate(("bkl", "mel", "nv")):
        for lesion in range(9 + 3 * c):
            rows += [{"image_id": f"{label}{lesion}_{i}", "lesion_id": f"L_{label}{lesion}", "dx": label}
                     for i in range(int(rng.integers(1, 4)))]
    table = pd.DataFrame(rows)
    first_mel0 = int(np.flatnonzero(table["lesion_id"] == "L_mel0")[0])
    first_mel1 = int(np.flatnonzero(table["lesion_id"] == "L_mel1")[0])
    groups = group_keys(table, pairs=[(first_mel0, first_mel1)]).to_numpy()
    assert groups[first_mel0] == groups[first_mel1]  # the copy joins the two lesions into one group
    folds = assign_folds(groups, table["dx"], 3, seed=5)
    assert set(folds) == {0, 1, 2}
    for group in set(groups):
        assert len(set(folds[groups == group])) == 1, group
    joined = table["lesion_id"].isin(["L_mel0", "L_mel1"]).to_numpy()
    assert len(set(folds[joined])) == 1
    for label in ("bkl", "mel", "nv"):
        assert set(folds[(table["dx"] == label).to_numpy()]) == {0, 1, 2}, label
    sizes = np.bincount(folds, minlength=3)
    assert sizes.max() - sizes.min() <= 6, sizes  # within a couple of lesions of each other
    np.testing.assert_array_equal(folds, assign_folds(groups, table["dx"], 3, seed=5))
    assert not np.array_equal(folds, assign_folds(groups, table["dx"], 3, seed=6))


def test_fold_rows_partition_train_and_val_and_never_touch_test(home: Path) -> None:
    from dermcam.data.dataset import load_prepared
    from dermcam.data.folds import pooled_rows, split_rows

    data = load_prepared("synth")
    pooled = pooled_rows(data)
    test_rows, _ = data.split("test")
    assert len(pooled) + len(test_rows) == len(data.index) and not set(pooled) & set(test_rows)
    held_out = [split_rows(data, "val", 3, i, 0)[0] for i in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(held_out)), pooled)
    for i in range(3):
        train, labels = split_rows(data, "train", 3, i, 0)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out[i]])), pooled)
        np.testing.assert_array_equal(labels, data.index["label"].to_numpy()[train])
        np.testing.assert_array_equal(split_rows(data, "test", 3, i, 0)[0], test_rows)
        groups = data.index["group"].to_numpy()
        assert not set(groups[train]) & set(groups[held_out[i]])


def test_fold_settings_are_checked() -> None:
    from dermcam.train.config import TrainConfig

    for bad, words in (({"folds": 1}, "--folds"), ({"folds": 21}, "--folds"), ({"fold": 0}, "--fold needs --folds"),
                       ({"folds": 3, "fold": 3}, "--fold"), ({"folds": "3"}, "folds")):
        with pytest.raises(BadInputError, match=words):
            TrainConfig(backbone="test_efficientnet", **bad).validate()
    TrainConfig(backbone="test_efficientnet", folds=3, fold=2).validate()


# ------------------------------------------------------------------------------- a cross-validation


def test_a_cross_validation_end_to_end(runner, home: Path) -> None:
    """K fold runs, each validated on its own fold and never on test; out-of-fold predictions of every
    train+val image exactly once; evaluate cv:NAME (table and --json); the ensemble scores on test."""
    from dermcam.data.dataset import load_prepared

    out = run_json(runner, ["train", *TINY, "--epochs", "1", "--folds", "2", "--ensemble", "duo", "--json"])
    assert out["id"] == "cv:duo" and out["status"] == "finished" and out["folds"] == 2
    assert out["ensemble"] == "ensemble:duo" and len(out["runs"]) == 2
    runs = {r["run_id"]: r for r in out["runs"]}
    assert [f["run"] for f in out["fold_runs"]] == list(runs)
    for i, (run_id, run) in enumerate(runs.items()):
        assert run["config"]["folds"] == 2 and run["config"]["fold"] == i
        assert run["test_metrics"] is None  # a fold never reads the test split
        assert not (home / "runs" / run_id / "report" / "metrics.json").exists()
        sidecar = json.loads((home / "runs" / run_id / "epoch-0000.json").read_text())
        fitted = sidecar["calibration"]["fitted_on"]
        assert fitted["split"] == "val" and fitted["n"] == out["fold_runs"][i]["images"]

    data = load_prepared("synth")
    oof = oof_rows(home, "duo")
    pooled = set(np.flatnonzero(data.index["split"].isin(["train", "val"]).to_numpy()))
    assert sorted(oof["row"]) == sorted(pooled) and oof["row"].is_unique  # every image once, no test image
    assert set(oof["image_id"]) == set(data.index["image_id"].iloc[sorted(pooled)])
    for i, run_id in enumerate(runs):
        fold = oof[oof["fold"] == i]
        assert set(fold["run"]) == {run_id} and len(fold) == out["fold_runs"][i]["images"]
        assert not set(fold["group"]) & set(oof[oof["fold"] != i]["group"])  # a group in one fold only
    np.testing.assert_array_equal(oof["label"], data.index["label"].to_numpy()[oof["row"]])

    estimate = run_json(runner, ["evaluate", "cv:duo", "--json"])
    assert estimate["images"] == len(pooled) and estimate["groups"] == oof["group"].nunique()
    assert estimate["split"] == "train+val (out of fold)"
    intervals = estimate["metrics"]["ci"]["intervals"]
    for key in ("balanced_accuracy", "macro_f1", "auc_macro", "recall_mel"):
        assert key in estimate["metrics"] and key in intervals
    assert estimate["metrics"]["balanced_accuracy"] == out["metrics"]["balanced_accuracy"]
    shown = cli(runner, "evaluate", "cv:duo")
    assert shown.exit_code == 0, shown.output
    assert "balanced accuracy" in shown.output and "ensemble:duo" in shown.output
    assert f"n={len(pooled)} images" in shown.output

    scored = run_json(runner, ["evaluate", "ensemble:duo", "--resamples", "0", "--json"])
    assert scored["split"] == "test" and scored["metrics"]["n"] == len(data.split("test")[0])
    members = run_json(runner, ["ensemble", "show", "duo", "--json"])
    assert sorted(m["id"] for m in members["members"]) == sorted(f["best"] for f in out["fold_runs"])
    assert all(abs(m["weight"] - 1 / 2) < 1e-6 for m in members["members"])
    assert members["selection"]["method"] == "cross-validation"

    refused(cli(runner, "evaluate", "cv:duo", "--split", "val"), ExitCode.BAD_INPUT, "--split", "cv:duo")
    refused(cli(runner, "evaluate", "cv:duo", "--data", "synth"), ExitCode.BAD_INPUT, "--data")
    refused(cli(runner, "evaluate", "cv:nope"), ExitCode.NOT_FOUND, "cv:duo")
    refused(cli(runner, "train", *TINY, "--folds", "2", "--ensemble", "duo"), ExitCode.BAD_INPUT, "duo")

    again = run_json(runner, ["train", "--resume", "--run", "cv:duo", "--json"])  # finished: nothing to train
    assert again["runs"] == [] and again["metrics"]["balanced_accuracy"] == out["metrics"]["balanced_accuracy"]

    record_path = home / "crossval" / "duo" / "cv.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "oof_file": "../../runs"}))
    refused(cli(runner, "evaluate", "cv:duo"), ExitCode.CORRUPT, "oof_file")
    record_path.write_text(json.dumps({**record, "folds": 3}))
    refused(cli(runner, "evaluate", "cv:duo"), ExitCode.CORRUPT)
    record_path.write_text(json.dumps(record))
    oof_path = home / "crossval" / "duo" / "oof.csv"
    lines = oof_path.read_text().splitlines()
    oof_path.write_text("\n".join([*lines, lines[1]]) + "\n")  # an image twice
    refused(cli(runner, "evaluate", "cv:duo"), ExitCode.CORRUPT, "oof.csv")


@pytest.mark.parametrize("how", ["latest", "cv-name"])
def test_an_interrupted_cross_validation_continues_with_the_next_fold(runner, home: Path, monkeypatch,
                                                                      how: str) -> None:
    """Fold 1 is interrupted after its first epoch's checkpoint; the resume continues fold 1 exactly
    from that checkpoint, then fold 2, and never trains fold 0 again."""
    from dermcam.train import trainer

    original_save = trainer.Trainer._save

    def save_then_die(self, *a, **kw):
        out = original_save(self, *a, **kw)
        if self.config.fold == 1 and self.epoch == 0:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(trainer.Trainer, "_save", save_then_die)
    args = ["train", *TINY, "--epochs", "2", "--folds", "3", "--ensemble", "cut"]
    assert cli(runner, *args).exit_code == 130
    monkeypatch.setattr(trainer.Trainer, "_save", original_save)
    record = json.loads((home / "crossval" / "cut" / "cv.json").read_text())
    assert [f["status"] for f in record["fold_runs"]] == ["finished", "training", "pending"]
    assert record["status"] == "running" and len(oof_rows(home, "cut")) == record["fold_runs"][0]["images"]
    first, second, third = (f["run"] for f in record["fold_runs"])
    before = files_of(home / "runs" / first)
    unfinished = cli(runner, "evaluate", "cv:cut", "--resamples", "0", "--json")
    assert unfinished.exit_code == 0 and "unfinished: 1 of 3 folds" in unfinished.output

    resume = ["train", "--resume", "--json"] + (["--run", "cv:cut"] if how == "cv-name" else [])
    out = run_json(runner, resume)
    assert [r["run_id"] for r in out["runs"]] == [second, third]
    assert out["runs"][0]["resumed_from"] == f"{second}:0" and out["runs"][1]["resumed_from"] is None
    assert files_of(home / "runs" / first) == before  # fold 0: not trained, not calibrated again
    assert out["status"] == "finished" and all(f["status"] == "finished" for f in out["fold_runs"])
    oof = oof_rows(home, "cut")
    assert oof["row"].is_unique and sorted(set(oof["fold"])) == [0, 1, 2] and len(oof) == out["images"]
    assert (home / "ensembles" / "cut.json").is_file()


def copy_cv(home: Path, name: str, new: str, **changes: object) -> Path:
    """A copy of cross-validation ``name`` as ``new`` (its record renamed, ``changes`` applied)."""
    folder = home / "crossval" / new
    shutil.copytree(home / "crossval" / name, folder)
    record = json.loads((folder / "cv.json").read_text())
    (folder / "cv.json").write_text(json.dumps({**record, "name": new, **changes}))
    return folder


def test_two_cross_validations_are_compared_out_of_fold_paired(runner, home: Path) -> None:
    """evaluate cv:B --against cv:A: each metric of both on the same images, B - A, its paired interval
    and what it supports; a copy whose predictions are near-perfect is clearly higher, and the same
    copy compared the other way round gives the negated difference. Images only one of them predicted
    are left out with a warning. Refusals: itself, another data set, not a cv:, no cv: to compare."""
    run_json(runner, ["train", *TINY, "--epochs", "1", "--folds", "2", "--json"])
    [name] = [p.name for p in (home / "crossval").iterdir()]
    folder = copy_cv(home, name, "sure")
    oof = oof_rows(home, "sure")
    p_cols = [c for c in oof.columns if c.startswith("p_")]
    sure = np.full((len(oof), len(p_cols)), 0.05)
    sure[np.arange(len(oof)), oof["label"]] = 1 - 0.05 * (len(p_cols) - 1)
    oof[p_cols] = sure
    oof.to_csv(folder / "oof.csv", index=False)

    out = run_json(runner, ["evaluate", "cv:sure", "--against", f"cv:{name}", "--json"])
    estimate = run_json(runner, ["evaluate", f"cv:{name}", "--resamples", "0", "--json"])
    assert out["cv"] == "cv:sure" and out["against"] == f"cv:{name}" and out["images"] == len(oof)
    assert out["split"] == "train+val (out of fold)" and out["groups"] == oof["group"].nunique()
    rows = {r["metric"]: r for r in out["metrics"]}
    assert {"balanced_accuracy", "macro_f1", "auc_macro", "recall_mel", "auc_mel"} <= set(rows)
    top = rows["balanced_accuracy"]
    assert top["cv"] == 1.0 and top["against"] == estimate["metrics"]["balanced_accuracy"] < 1.0
    assert top["difference"] == pytest.approx(1.0 - top["against"])
    assert top["ci"][0] > 0 and top["verdict"] == "cv:sure higher"

    back = run_json(runner, ["evaluate", f"cv:{name}", "--against", "cv:sure", "--json"])
    back_top = {r["metric"]: r for r in back["metrics"]}["balanced_accuracy"]
    assert back_top["difference"] == pytest.approx(-top["difference"]) and back_top["verdict"] == "cv:sure higher"
    shown = cli(runner, "evaluate", "cv:sure", "--against", f"cv:{name}")
    assert shown.exit_code == 0, shown.output
    assert "balanced accuracy" in shown.output and "B higher" in shown.output and "paired" in shown.output
    assert f"A = cv:{name}, B = cv:sure" in shown.output

    oof.iloc[: len(oof) - 3].to_csv(folder / "oof.csv", index=False)  # three images not predicted
    fewer = cli(runner, "evaluate", "cv:sure", "--against", f"cv:{name}", "--resamples", "0", "--json")
    assert fewer.exit_code == 0 and "3 images the other did not" in fewer.output
    assert json.loads(fewer.stdout)["images"] == len(oof) - 3

    record = json.loads((folder / "cv.json").read_text())
    copy_cv(home, name, "elsewhere", dataset={**record["dataset"], "fingerprint": "0" * 64})
    refused(cli(runner, "evaluate", "cv:elsewhere", "--against", f"cv:{name}"), ExitCode.BAD_INPUT, "same data set")
    refused(cli(runner, "evaluate", f"cv:{name}", "--against", f"cv:{name}"), ExitCode.BAD_INPUT, "itself")
    refused(cli(runner, "evaluate", f"cv:{name}", "--against", name), ExitCode.BAD_INPUT, "cv:NAME")
    refused(cli(runner, "evaluate", f"cv:{name}", "--against", "cv:nope"), ExitCode.NOT_FOUND, "cv:nope")
    refused(cli(runner, "evaluate", "best", "--against", f"cv:{name}"), ExitCode.BAD_INPUT, "--against")


def test_refusals_are_one_line_before_any_work(runner, home: Path, tmp_path: Path) -> None:
    external = home / "datasets" / "ext"
    shutil.copytree(home / "datasets" / "synth", external)
    manifest = json.loads((external / "manifest.json").read_text())
    (external / "manifest.json").write_text(json.dumps({**manifest, "name": "ext", "external": True}))
    toml = tmp_path / "runs.toml"
    toml.write_text("[[run]]\nlr = 0.001\n")
    base = [a for a in TINY if a not in ("--data", "synth")]
    for args, words in (
        (["--data", "synth", "--folds", "1"], ["--folds"]),
        (["--data", "synth", "--folds", "21"], ["--folds"]),
        (["--data", "synth", "--folds", "2", "--lr", "1e-3", "--lr", "3e-4"], ["one configuration", "--lr"]),
        (["--data", "synth", "--folds", "2", "--config", str(toml)], ["--config"]),
        (["--data", "synth", "--folds", "20"], ["--folds 20", "groups"]),
        (["--data", "ext", "--folds", "2"], ["--external"]),
        (["--data", "synth", "--folds", "2", "--ensemble", "best"], ["best"]),
        (["--data", "synth", "--folds", "2", "--ensemble", "../x"], ["../x"]),
    ):
        refused(cli(runner, "train", *base, *args), ExitCode.BAD_INPUT, *words)
    refused(cli(runner, "train", "--resume", "--run", "cv:nothing"), ExitCode.NOT_FOUND, "cv:nothing")
    assert not (home / "runs").exists() and not (home / "crossval").exists()


def test_oof_predictions_round_trip_exactly(tmp_path: Path) -> None:
    """Probabilities are written with repr, so what is read back is bit for bit what was predicted."""
    from dermcam.store.crossval import CrossValidation, OutOfFold, read_oof, write_oof

    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    record = {"name": "x", "classes": ["a", "b", "c"], "folds": 2, "oof_file": "oof.csv",
              "fold_runs": [{"fold": 0, "run": "aaaaaa", "best": "aaaaaa:3", "status": "finished"},
                            {"fold": 1, "run": "bbbbbb", "best": None, "status": "pending"}]}
    cv = CrossValidation(tmp_path / "x" / "cv.json", record)
    oof = OutOfFold([f"i{i}" for i in range(5)], np.arange(5) * 2, np.zeros(5, np.int64), ["aaaaaa"] * 5,
                    ["aaaaaa:3"] * 5, np.array(["g1", "g1", "g2", "g3", "g3"], dtype=object),
                    np.array([0, 1, 2, 0, 1]), probs)
    write_oof(cv, oof)
    back = read_oof(cv)
    np.testing.assert_array_equal(back.probs, probs)
    np.testing.assert_array_equal(back.row, oof.row)
    assert back.image_id == oof.image_id and list(back.group) == list(oof.group)
    with open(tmp_path / "x" / "oof.csv", newline="") as handle:
        assert next(csv.reader(handle))[-3:] == ["p_a", "p_b", "p_c"]
