"""`dermcam prepare`: the on-disk contract, cleaning, lesion-grouped splits, caching and reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.cli import app
from dermcam.data.images import decode_image
from dermcam.data.split import leakage_audit, split_by_lesion

# fixtures_ham is both a plugin (its fixtures, below) and a helper module: registering it before the
# import keeps pytest from warning that the plugin was imported too early.
pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import BAD_KINDS, CONVERTED, add_bad_inputs, break_csv, image_path, read_csv  # noqa: E402

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "32x24"]
MANIFEST_KEYS = ["schema", "name", "source", "created", "dermcam_version", "classes", "label_encoding",
                 "fingerprint", "cache", "fingerprints", "seed", "fractions", "max_per_class", "counts", "lesions",
                 "leakage", "problems", "layout", "layout_detail", "external", "grouping", "classes_from",
                 "other_classes", "near_duplicates"]
INDEX_COLUMNS = ["image_id", "lesion_id", "dx", "label", "split", "dx_type", "age", "sex", "localization",
                 "source", "sha256", "patient_id", "dataset", "group"]


def run_json(runner, *args: str, code: int = 0) -> dict:
    size = [] if "--cache-size" in args else SMALL_CACHE
    result = runner.invoke(app, ["prepare", *args, *size, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def store_snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted((home / "datasets").rglob("*")) if p.is_file()}


def test_prepare_writes_the_documented_format(runner, ham_src: Path, dermcam_home: Path) -> None:
    report = run_json(runner, str(ham_src))
    folder = dermcam_home / "datasets" / "ham10000"
    assert report["path"] == str(folder) and not report["up_to_date"]

    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest) == MANIFEST_KEYS and manifest == report["manifest"]
    assert manifest["schema"] == "dermcam.dataset/1" and manifest["source"] == str(ham_src.resolve())
    assert manifest["classes"] == ["bkl", "mel", "nv"]
    assert manifest["label_encoding"] == {"bkl": 0, "mel": 1, "nv": 2}
    assert manifest["cache"] == {"file": "images.npy", "width": 32, "height": 24, "dtype": "uint8", "layout": "NHWC",
                                 "format": 1}
    assert manifest["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert manifest["problems"] == {}

    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)
    assert list(index.columns) == INDEX_COLUMNS
    assert len(index) == len(read_csv(ham_src)) == report["images"]
    assert (index["label"].astype(int) == index["dx"].map(manifest["label_encoding"])).all()
    counts = index.groupby(["split", "dx"]).size()
    assert all(counts.get((s, c), 0) == n for s, per in manifest["counts"].items() for c, n in per.items())

    images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
    assert images.shape == (len(index), 24, 32, 3) and images.dtype == np.uint8
    for row in (0, len(index) - 1):  # row i of the cache is the decoded image of index row i
        expected, _ = decode_image(ham_src / index["source"][row], (32, 24))
        assert np.array_equal(images[row], expected)
    problems = pd.read_csv(folder / "problems.csv")
    assert list(problems.columns) == ["file", "image_id", "kind", "action", "detail"] and problems.empty


def test_summary_on_screen(runner, ham_src: Path) -> None:
    result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE, "--name", "demo"])
    assert result.exit_code == 0, result.output
    for text in ("Prepared data set demo", "Splits (grouped: no lesion or patient on two sides)", "bkl (0)", "mel (1)", "nv (2)",
                 "train/val 0, train/test 0, val/test 0", "No problems found", "images.npy"):
        assert text in result.stdout


def test_every_bad_input_is_fixed_or_skipped_and_reported(runner, ham_src: Path, dermcam_home: Path) -> None:
    case = add_bad_inputs(ham_src)
    report = run_json(runner, str(ham_src), code=5)  # 5: finished, but some inputs were skipped
    folder = Path(report["path"])
    problems = pd.read_csv(folder / "problems.csv", dtype=str, keep_default_na=False)
    assert set(problems["kind"]) == set(BAD_KINDS)
    for kind, action in BAD_KINDS.items():
        assert set(problems.loc[problems["kind"] == kind, "action"]) == {action}, kind
    by_kind = problems.groupby("kind")["image_id"].apply(set)
    for name in (*CONVERTED,):
        assert case[name] in by_kind["converted"]
    for kind in BAD_KINDS:
        if kind not in ("converted", "missing_column"):
            assert case[kind] in by_kind[kind], kind
    assert report["manifest"]["problems"] == problems["kind"].value_counts().to_dict()

    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)
    kept = set(index["image_id"])
    skipped = {case[k] for k, action in BAD_KINDS.items() if action == "skipped"}
    assert not skipped & kept
    fixed = {case[k] for k in (*CONVERTED, "listed_twice", "missing_lesion_id", "duplicate_file")}
    assert fixed <= kept
    assert (index["image_id"] == case["listed_twice"]).sum() == 1
    assert (index["localization"] == "").all()

    images = np.load(folder / "images.npy", mmap_mode="r")
    assert images.shape[0] == len(index)
    for name in ("png16", "tiff16", "grayscale"):  # 16-bit is rescaled to 8 bits, not clipped to white
        row = images[int(np.flatnonzero(index["image_id"] == case[name])[0])]
        assert 40 < row.mean() < 230 and np.array_equal(row[..., 0], row[..., 2])


def test_bad_inputs_are_counted_on_screen(runner, ham_src: Path) -> None:
    add_bad_inputs(ham_src)
    result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE])
    assert result.exit_code == 5
    for kind in BAD_KINDS:
        assert kind in result.stdout
    assert "problems.csv" in result.stdout


@pytest.mark.parametrize("how", ["not_csv", "missing_columns", "no_csv", "empty"])
def test_unusable_metadata_is_a_one_line_error_and_the_store_survives(runner, ham_src: Path, dermcam_home: Path,
                                                                       how: str) -> None:
    run_json(runner, str(ham_src), "--name", "keep")
    before = store_snapshot(dermcam_home)
    break_csv(ham_src, how)
    result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE, "--name", "keep"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert store_snapshot(dermcam_home) == before
    assert sorted(p.name for p in (dermcam_home / "datasets").iterdir()) == ["keep"]


def test_failure_while_building_leaves_the_old_set_untouched(runner, ham_src: Path, dermcam_home: Path) -> None:
    run_json(runner, str(ham_src), "--name", "keep")
    before = store_snapshot(dermcam_home)
    for image_id in read_csv(ham_src).query("dx == 'mel'")["image_id"]:
        image_path(ham_src, image_id).write_bytes(b"garbage")  # the build starts, then finds no usable mel
    result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE, "--name", "keep"])
    assert result.exit_code == 2 and "no usable images of class mel" in result.stderr
    assert store_snapshot(dermcam_home) == before
    assert sorted(p.name for p in (dermcam_home / "datasets").iterdir()) == ["keep"]


@pytest.mark.parametrize("args, message", [
    (["--classes", "nv,foo"], "unknown class code"),
    (["--classes", "nv"], "at least two classes"),
    (["--fractions", "0.5,0.5,0.5"], "must sum to 1"),
    (["--fractions", "a,b,c"], "three numbers"),
    (["--cache-size", "big"], "WIDTHxHEIGHT"),
    (["--name", "../evil"], "data set name"),
])
def test_bad_options_exit_2(runner, ham_src: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["prepare", str(ham_src), *args])
    assert result.exit_code == 2 and message in result.stderr


def test_missing_source_exits_3(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", str(tmp_path / "nowhere")])
    assert result.exit_code == 3 and "does not exist" in result.stderr


def test_split_is_grouped_by_lesion_and_stratified(runner, synthetic_master: Path, tmp_path: Path) -> None:
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(tmp_path / "bigger", n_lesions_per_class=25, size=(24, 18), seed=3)
    index = pd.read_csv(Path(run_json(runner, str(src), "--seed", "5")["path"]) / "index.csv",
                        keep_default_na=False)
    assert (index.groupby("lesion_id")["split"].nunique() == 1).all()
    shares = pd.crosstab(index["dx"], index["split"], normalize="index")
    for split, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert (shares[split] - fraction).abs().max() < 0.06, shares


def test_split_function_exact_grouping_and_ratios_on_many_lesions() -> None:
    rng = np.random.default_rng(0)
    groups = [f"L{i}" for i in range(3000) for _ in range(int(rng.integers(1, 5)))]
    labels = [["nv", "mel", "bkl"][int(g[1:]) % 3] for g in groups]
    splits = split_by_lesion(groups, labels, (0.7, 0.15, 0.15), seed=1)
    assert leakage_audit(groups, splits) == {"train/val": 0, "train/test": 0, "val/test": 0}
    shares = pd.crosstab(pd.Series(labels), pd.Series(splits), normalize="index")
    assert (shares["train"] - 0.7).abs().max() < 0.005 and (shares["test"] - 0.15).abs().max() < 0.005
    assert np.array_equal(splits, split_by_lesion(groups, labels, (0.7, 0.15, 0.15), seed=1))
    assert not np.array_equal(splits, split_by_lesion(groups, labels, (0.7, 0.15, 0.15), seed=2))
    tiny = split_by_lesion(["a", "b", "c"], ["nv"] * 3, (0.7, 0.15, 0.15), seed=0)
    assert sorted(tiny) == ["test", "train", "val"]  # three lesions: one in each split


def test_leakage_audit_counts_shared_lesions() -> None:
    assert leakage_audit(["a", "a", "b", "c"], ["train", "val", "val", "test"])["train/val"] == 1


def test_max_per_class_samples_whole_lesions(runner, ham_src: Path) -> None:
    report = run_json(runner, str(ham_src), "--max-per-class", "5", "--seed", "1")
    assert all(sum(report["manifest"]["counts"][s][c] for s in ("train", "val", "test")) <= 5
               for c in ("bkl", "mel", "nv"))
    assert report["manifest"]["max_per_class"] == 5 and report["capped"] > 0
    index = pd.read_csv(Path(report["path"]) / "index.csv", keep_default_na=False)
    source = read_csv(ham_src)
    for lesion, rows in index.groupby("lesion_id"):
        assert len(rows) == (source["lesion_id"] == lesion).sum()  # no lesion cut in half


def test_classes_option_sets_the_label_encoding(runner, ham_src: Path) -> None:
    report = run_json(runner, str(ham_src), "--classes", "nv,mel")
    assert report["manifest"]["label_encoding"] == {"mel": 0, "nv": 1}
    assert report["excluded"] == (read_csv(ham_src)["dx"] == "bkl").sum()


def test_second_run_reuses_the_set(runner, ham_src: Path) -> None:
    first = run_json(runner, str(ham_src))
    cache = Path(first["path"]) / "images.npy"
    inode = cache.stat().st_ino
    result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE])
    assert result.exit_code == 0 and "up to date, reused cache" in result.stdout
    second = run_json(runner, str(ham_src))
    assert second["up_to_date"] and second["decoded"] == 0
    assert second["manifest"] == first["manifest"] and cache.stat().st_ino == inode
    changed = run_json(runner, str(ham_src), "--seed", "1")  # an option that changes the output
    assert not changed["up_to_date"] and changed["manifest"]["fingerprint"] != first["manifest"]["fingerprint"]
    assert changed["reused"] == first["images"] and changed["decoded"] == 0


def test_changed_image_is_the_only_one_decoded(runner, ham_src: Path) -> None:
    first = run_json(runner, str(ham_src))
    victim = read_csv(ham_src)["image_id"][3]
    path = image_path(ham_src, victim)
    Image.open(path).transpose(Image.Transpose.ROTATE_180).save(path, quality=90)
    second = run_json(runner, str(ham_src))
    assert (second["reused"], second["decoded"]) == (first["images"] - 1, 1)
    assert second["manifest"]["fingerprint"] != first["manifest"]["fingerprint"]
    folder = Path(second["path"])
    index = pd.read_csv(folder / "index.csv", keep_default_na=False)
    row = int(np.flatnonzero(index["image_id"] == victim)[0])
    assert np.array_equal(np.load(folder / "images.npy")[row], decode_image(path, (32, 24))[0])


def test_flat_images_folder_and_case_insensitive_names(runner, ham_src: Path) -> None:
    (ham_src / "HAM10000_images_part_1").rename(ham_src / "ham10000_IMAGES_part_1")
    for path in (ham_src / "HAM10000_images_part_2").iterdir():
        (ham_src / "Images").mkdir(exist_ok=True)
        path.rename(ham_src / "Images" / path.name)
    (ham_src / "HAM10000_images_part_2").rmdir()
    report = run_json(runner, str(ham_src), "--name", "flat")
    assert report["images"] == len(read_csv(ham_src)) and report["manifest"]["problems"] == {}


def test_decode_covers_and_crops_other_aspect_ratios(tmp_path: Path) -> None:
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, :200] = (255, 0, 0)
    wide[:, 200:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    array, note = decode_image(tmp_path / "wide.png", (32, 24))
    assert array.shape == (24, 32, 3) and note is None
    assert (array[:, :14, 0] > 200).all() and (array[:, 18:, 2] > 200).all()  # centre crop, not squashed


@pytest.mark.slow
def test_ham10000_lite_has_no_leakage(runner, ham10000_lite: Path) -> None:
    report = run_json(runner, str(ham10000_lite), "--cache-size", "16x12")
    manifest = report["manifest"]
    assert manifest["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert manifest["problems"] == {}
    totals = {c: sum(manifest["counts"][s][c] for s in manifest["counts"]) for c in manifest["classes"]}
    assert totals == {"bkl": 936, "mel": 933, "nv": 5698}
    index = pd.read_csv(Path(report["path"]) / "index.csv", keep_default_na=False)
    assert (index.groupby("lesion_id")["split"].nunique() == 1).all()
    shares = pd.crosstab(index["dx"], index["split"], normalize="index")
    assert (shares["train"] - 0.7).abs().max() < 0.01 and (shares["val"] - 0.15).abs().max() < 0.01
    lesions = index.groupby("split")["lesion_id"].nunique() / index["lesion_id"].nunique()
    assert abs(lesions["train"] - 0.7) < 0.03  # lesion sizes spread evenly, not only singletons in val/test
