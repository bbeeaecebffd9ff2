"""Bring your own data (issue #13, part A): `dermcam prepare` reads HAM10000, ISIC challenge CSVs, one
folder per class and any CSV of paths and labels, detected automatically; --external sets are only
ever evaluated on. Tiny generated images, through the CLI runner."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.cli import app
from dermcam.data.dataset import load_prepared
from dermcam.data.sources import read_source
from dermcam.data.sources.common import COLUMNS
from dermcam.data.split import split_by_lesion

pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import read_csv, write_csv  # noqa: E402

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "16x12"]
NEW_MANIFEST_KEYS = ["layout", "layout_detail", "external", "grouping", "classes_from", "other_classes"]
NEW_INDEX_COLUMNS = ["patient_id", "dataset", "group"]
SUBGROUP_COLUMNS = ["sex", "age", "localization", "dataset", "group"]


# Building sources -------------------------------------------------------------------------------------

def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


ISIC_2019_CODES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def isic_one_hot(src: Path) -> Path:
    """ISIC 2019: one-hot ground truth (with AK, SCC and UNK), a metadata CSV, images one folder down;
    plus a row with two 1s and a row with none."""
    plan = [("MEL", 6), ("NV", 6), ("BKL", 6), ("SCC", 2), ("AK", 2), ("UNK", 1)]
    truth, meta = [], []
    n = 0
    for code, count in plan:
        for _ in range(count):
            n += 1
            image = f"ISIC_{n:07d}"
            truth.append([image] + ["1.0" if c == code else "0.0" for c in ISIC_2019_CODES])
            lesion = f"IL_{(n + 1) // 2:07d}" if n % 5 else ""  # pairs within a class; every 5th has none
            meta.append([image, str(20 + n), "anterior torso", lesion, "male" if n % 2 else "female"])
            write_image(src / "ISIC_2019_Training_Input" / f"{image}.jpg", n)
    for image, ones in (("ISIC_0000098", ("MEL", "NV")), ("ISIC_0000099", ())):
        truth.append([image] + ["1.0" if c in ones else "0.0" for c in ISIC_2019_CODES])
        write_image(src / "ISIC_2019_Training_Input" / f"{image}.jpg", 99)
    write_rows(src / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_2019_CODES], truth)
    write_rows(src / "ISIC_2019_Training_Metadata.csv",
               ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
    return src


def isic_2018(src: Path) -> Path:
    """ISIC 2018 task 3: the ground truth in its own folder, AKIEC, images in a sibling folder."""
    codes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = []
    for n in range(12):
        code = ["MEL", "NV", "DF", "AKIEC"][n % 4]
        rows.append([f"ISIC_{n:07d}"] + ["1.0" if c == code else "0.0" for c in codes])
        write_image(src / "ISIC2018_Task3_Training_Input" / f"ISIC_{n:07d}.jpg", n)
    write_rows(src / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
               ["image", *codes], rows)
    return src


DIAGNOSES_2020 = ["melanoma", "nevus", "seborrheic keratosis", "solar lentigo", "nevus", "lentigo NOS",
                  "lichenoid keratosis", "melanoma", "basal cell carcinoma", "cafe-au-lait macule", "nevus"]


def isic_2020(src: Path) -> Path:
    """ISIC 2020: image_name, patient_id (1-3 images per patient), diagnosis in words, some unknown."""
    rows = []
    n = 0
    for patient in range(30):
        for k in range(1 + patient % 3):
            n += 1
            diagnosis = "unknown" if n % 13 == 0 else DIAGNOSES_2020[(patient + k) % len(DIAGNOSES_2020)]
            patient_id = "" if patient >= 28 else f"IP_{patient:07d}"  # two patients without an id
            rows.append([f"ISIC_{n:07d}", patient_id, "female", str(30 + patient), "torso", diagnosis,
                         "malignant" if diagnosis == "melanoma" else "benign", str(int(diagnosis == "melanoma"))])
            write_image(src / "train" / f"ISIC_{n:07d}.jpg", n)
    write_rows(src / "ISIC_2020_Training_GroundTruth.csv",
               ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
                "benign_malignant", "target"], rows)
    return src


def class_folders(src: Path, counts: dict[str, int] | None = None) -> Path:
    """One folder per class, each image under a name of its own."""
    for i, (name, count) in enumerate((counts or {"mel": 4, "nv": 4, "bkl": 4}).items()):
        for k in range(count):
            write_image(src / name / f"{name.replace(' ', '')}_{k}.jpg", 100 * i + k)
    return src


def csv_source(src: Path) -> Path:
    """labels.csv (path, diagnosis, patient, sex, age_approx) beside images/."""
    rows = []
    for n in range(12):
        dx = ["mel", "nv", "bkl"][n % 3]
        write_image(src / "images" / f"img_{n}.jpg", n)
        rows.append([f"images/img_{n}.jpg", dx.upper(), f"P{n // 2}", "male", "50"])
    write_rows(src / "labels.csv", ["path", "diagnosis", "patient", "sex", "age_approx"], rows)
    return src


# Running prepare --------------------------------------------------------------------------------------

def prepare_json(runner, *args: str, code: int = 0) -> dict:
    result = runner.invoke(app, ["prepare", *args, *SMALL_CACHE, "--json"])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def index_of(report: dict) -> pd.DataFrame:
    return pd.read_csv(Path(report["path"]) / "index.csv", dtype=str, keep_default_na=False)


def problems_of(report: dict) -> pd.DataFrame:
    return pd.read_csv(Path(report["path"]) / "problems.csv", dtype=str, keep_default_na=False)


def kinds(report: dict) -> dict[str, list[str]]:
    problems = problems_of(report)
    return {k: sorted(rows["image_id"]) for k, rows in problems.groupby("kind")}


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def assert_grouped(index: pd.DataFrame, column: str) -> None:
    known = index[index[column] != ""]
    assert (known.groupby(column)["split"].nunique() == 1).all(), f"a {column} spans two splits"


def store_files(home: Path) -> dict[str, str]:
    folder = home / "datasets"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# Detection --------------------------------------------------------------------------------------------

BUILDERS = {"isic2019": (isic_one_hot, "isic"), "isic2018": (isic_2018, "isic"), "isic2020": (isic_2020, "isic"),
            "folders": (class_folders, "folders"), "csv": (csv_source, "csv")}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_each_layout_is_detected_and_normalised(kind: str, tmp_path: Path) -> None:
    build, layout = BUILDERS[kind]
    source = read_source(build(tmp_path / kind))
    assert source.layout == layout and source.detail.startswith("detected; ")
    assert list(source.table.columns) == [*COLUMNS, "where"] and len(source.table) > 0


def test_ham10000_is_detected(runner, ham_src: Path) -> None:
    report = prepare_json(runner, str(ham_src))
    assert report["manifest"]["layout"] == "ham10000"
    assert report["manifest"]["layout_detail"].startswith("detected; metadata HAM10000_metadata.csv")


def test_layout_option_forces_a_layout(runner, tmp_path: Path) -> None:
    src = class_folders(tmp_path / "both")  # class folders, and a CSV that lists them too (with other labels)
    rows = [[p.relative_to(src).as_posix(), "nv" if p.parent.name == "mel" else p.parent.name]
            for p in sorted(src.rglob("*.jpg"))]
    write_rows(src / "list.csv", ["path", "label"], rows)
    detected = prepare_json(runner, str(src), "--name", "auto", "--classes", "nv,bkl")
    assert detected["manifest"]["layout"] == "csv"
    forced = prepare_json(runner, str(src), "--name", "forced", "--layout", "folders")
    assert forced["manifest"]["layout"] == "folders"
    assert forced["manifest"]["layout_detail"].startswith("--layout; ")
    assert forced["manifest"]["classes"] == ["bkl", "mel", "nv"]
    result = runner.invoke(app, ["prepare", str(src), "--layout", "isic", *SMALL_CACHE])
    assert_one_line_error(result, "no ISIC ground-truth CSV")


# ISIC --------------------------------------------------------------------------------------------------

def test_isic_one_hot_with_unk_scc_and_ambiguous_rows(runner, tmp_path: Path) -> None:
    src = isic_one_hot(tmp_path / "isic2019")
    report = prepare_json(runner, str(src), code=5)  # skipped rows: exit 5, the set is written
    manifest = report["manifest"]
    assert manifest["layout"] == "isic" and "ISIC_2019_Training_Metadata.csv" in manifest["layout_detail"]
    assert manifest["classes"] == ["bkl", "mel", "nv"] and manifest["classes_from"] == "default"
    assert manifest["other_classes"] == {"akiec": 2, "scc": 2}  # AK is akiec
    found = kinds(report)
    assert found["ambiguous_label"] == ["ISIC_0000098", "ISIC_0000099"]  # two 1s, no 1
    assert found["unknown_dx"] == ["ISIC_0000023"]  # UNK
    assert "unlisted_image" not in found  # skipped rows name their images: not reported twice
    assert found["missing_lesion_id"] == ["ISIC_0000005", "ISIC_0000010", "ISIC_0000015"]
    details = problems_of(report).set_index("image_id")["detail"]
    assert "several class columns are 1 (MEL, NV)" in details["ISIC_0000098"]

    index = index_of(report).set_index("image_id")
    assert len(index) == 18 and manifest["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert index.loc["ISIC_0000001", ["age", "localization", "sex", "lesion_id"]].tolist() == [
        "21", "anterior torso", "male", "IL_0000001"]  # joined from the metadata CSV
    assert index.loc["ISIC_0000001", "source"] == "ISIC_2019_Training_Input/ISIC_0000001.jpg"
    assert (index["dataset"] == "").all() and (index["patient_id"] == "").all()
    assert manifest["grouping"] == {"lesion": 9, "patient": 0, "image": 3}
    assert_grouped(index.reset_index(), "lesion_id")

    chosen = prepare_json(runner, str(src), "--classes", "MEL,nv,scc,akiec", "--name", "four", code=5)
    assert chosen["manifest"]["label_encoding"] == {"akiec": 0, "mel": 1, "nv": 2, "scc": 3}
    assert chosen["manifest"]["classes_from"] == "option" and chosen["manifest"]["other_classes"] == {"bkl": 6}


def test_isic_2018_ground_truth_one_folder_down(runner, tmp_path: Path) -> None:
    report = prepare_json(runner, str(isic_2018(tmp_path / "isic2018")))
    manifest = report["manifest"]
    assert manifest["layout"] == "isic" and manifest["problems"] == {}
    assert manifest["classes"] == ["akiec", "df", "mel", "nv"] and manifest["classes_from"] == "found"
    assert set(index_of(report)["group"]) == {f"image:ISIC_{n:07d}" for n in range(12)}


def test_isic_2020_is_grouped_by_patient(runner, tmp_path: Path) -> None:
    src = isic_2020(tmp_path / "isic2020")
    report = prepare_json(runner, str(src), "--seed", "3", code=5)
    manifest = report["manifest"]
    index = index_of(report)
    assert manifest["layout"] == "isic" and manifest["classes"] == ["bkl", "mel", "nv"]
    assert set(manifest["other_classes"]) == {"bcc", "cafe-au-lait_macule"}  # kept under their own names
    assert set(kinds(report)) == {"unknown_dx"}  # "unknown" diagnoses only; no missing_lesion_id (no lesions)
    assert_grouped(index, "patient_id")  # no patient on two sides of a split
    assert manifest["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    with_patient = index["patient_id"] != ""
    assert (index.loc[with_patient, "group"] == "patient:" + index.loc[with_patient, "patient_id"]).all()
    assert (index.loc[~with_patient, "group"] == "image:" + index.loc[~with_patient, "image_id"]).all()
    assert manifest["grouping"]["lesion"] == 0 and manifest["grouping"]["patient"] > 10
    assert manifest["grouping"]["image"] == (~with_patient).sum()
    assert set(index["split"]) == {"train", "val", "test"}
    assert set(index["localization"]) == {"torso"} and set(index["age"]) > {"30"}  # renamed ISIC columns
    for column in SUBGROUP_COLUMNS:
        assert column in index.columns


def test_several_ground_truths_are_refused_and_nothing_is_stored(runner, tmp_path: Path, dermcam_home: Path) -> None:
    src = isic_2018(tmp_path / "isic")
    prepare_json(runner, str(src), "--name", "keep")
    before = store_files(dermcam_home)
    other = src / "ISIC2018_Task3_Validation_GroundTruth"
    other.mkdir()
    (other / "ISIC2018_Task3_Validation_GroundTruth.csv").write_text(
        (src / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").read_text())
    assert_one_line_error(runner.invoke(app, ["prepare", str(src), "--name", "keep", *SMALL_CACHE]),
                          "several ISIC ground-truth CSVs")
    assert store_files(dermcam_home) == before


# One folder per class ---------------------------------------------------------------------------------

def test_folders_with_a_mistyped_class_folder(runner, tmp_path: Path) -> None:
    src = class_folders(tmp_path / "derm", {"mel": 4, "nv": 4, "bkl": 4, "mle": 3, "Basal Cell Carcinoma": 2})
    write_image(src / "nv" / "more" / "deep" / "nv_extra.jpg", 7)  # deeper folders are not classes
    write_image(src / "bkl" / "mel_0.jpg", 8)  # one stem in two class folders: ambiguous
    write_image(src / "stray.jpg", 9)  # outside every class folder
    result = runner.invoke(app, ["prepare", str(src), *SMALL_CACHE])
    assert result.exit_code == 5, result.output
    for text in ("Layout: folders", "Other classes left out (images): basal_cell_carcinoma 2, mle 3",
                 "default nv,bkl,mel", "12 images"):
        assert text in result.stdout, result.stdout

    report = prepare_json(runner, str(src), code=5)
    manifest = report["manifest"]
    assert manifest["classes"] == ["bkl", "mel", "nv"] and report["excluded"] == 5
    assert manifest["other_classes"] == {"basal_cell_carcinoma": 2, "mle": 3}
    found = kinds(report)
    assert found["duplicate_image_id"] == ["mel_0"] and found["unlisted_image"] == ["stray"]
    index = index_of(report).set_index("image_id")
    assert index.loc["nv_extra", ["dx", "source"]].tolist() == ["nv", "nv/more/deep/nv_extra.jpg"]
    assert "mel_0" not in index.index and len(index) == 4 + 5 + 3
    assert manifest["grouping"] == {"lesion": 0, "patient": 0, "image": 12}
    problems = problems_of(report).set_index("kind")
    assert problems.loc["duplicate_image_id", "file"] == "bkl/mel_0.jpg, mel/mel_0.jpg"


def test_a_class_name_must_be_plain(runner, tmp_path: Path) -> None:
    src = class_folders(tmp_path / "derm", {"mel": 3, "nv": 3, "what?": 2})
    report = prepare_json(runner, str(src), code=5)
    assert kinds(report)["unknown_dx"] == ["what?_0", "what?_1"]
    assert report["manifest"]["classes"] == ["mel", "nv"] and report["manifest"]["classes_from"] == "found"
    assert_one_line_error(runner.invoke(app, ["prepare", str(src), "--classes", "mel,zzz", *SMALL_CACHE]),
                          "unknown class code(s) zzz", "the source has mel, nv")


# A CSV of paths and labels ----------------------------------------------------------------------------

def test_csv_layout_with_missing_files_and_paths_leaving_the_folder(runner, tmp_path: Path) -> None:
    src = csv_source(tmp_path / "team")
    write_image(tmp_path / "outside.jpg", 50)  # exists, but outside the source: never read
    write_image(src / "images" / "img_20.png", 20)
    write_image(src / "images" / "img_21.jpg", 21)
    rows = [["images/gone.jpg", "mel"], ["../outside.jpg", "nv"], ["images/../../outside.jpg", "nv"],
            [str(tmp_path / "outside.jpg"), "nv"], ["images/img_20", "nv"],  # listed without its extension
            ["images/img_21.jpg", "mel?"]]
    with (src / "labels.csv").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([*row, "P10", "male", "50"] for row in rows)

    args = ["--image-col", "PATH", "--label-col", "diagnosis", "--patient-col", "patient"]
    report = prepare_json(runner, str(src), *args, code=5)
    manifest = report["manifest"]
    assert manifest["layout"] == "csv" and manifest["layout_detail"].startswith("--*-col options; CSV labels.csv")
    found = kinds(report)
    assert found["missing_image"] == ["gone"]
    assert found["unsafe_path"] == ["outside", "outside", "outside"]
    assert found["unknown_dx"] == ["img_21"]
    index = index_of(report)
    outside = hashlib.sha256((tmp_path / "outside.jpg").read_bytes()).hexdigest()
    assert outside not in set(index["sha256"]) and not index["source"].str.contains(r"\.\.").any()
    assert "images/img_20.png" in set(index["source"]) and len(index) == 13
    assert set(index["dx"]) == {"bkl", "mel", "nv"}  # labels matched ignoring case
    assert_grouped(index, "patient_id")
    assert (index["group"] == "patient:" + index["patient_id"]).all() and (index["age"] == "50").all()

    again = prepare_json(runner, str(src / "labels.csv"), "--image-col", "path", "--label-col", "diagnosis",
                         "--group-col", "patient", "--name", "by-file", code=5)  # the CSV itself as SRC
    assert again["manifest"]["source"] == str(src.resolve())
    grouping = again["manifest"]["grouping"]  # --group-col patient: also recognised as the patient column
    assert grouping["lesion"] + grouping["patient"] == 7 and grouping["image"] == 0


@pytest.mark.parametrize("args, message", [
    (["--image-col", "nope"], "no column --image-col nope"),
    (["--layout", "isic", "--image-col", "path"], "--image-col is for --layout csv"),
    (["--layout", "nonsense"], "--layout 'nonsense' is not one of"),
    (["--group-col", "patient", "--lesion-col", "patient"], "not both"),
    (["--fractions", "0,0,1"], "--external"),
    (["--external", "--fractions", "0.7,0.15,0.15"], "leave out --fractions"),
])
def test_bad_options_are_one_line_errors_and_store_nothing(runner, tmp_path: Path, dermcam_home: Path,
                                                           args: list[str], message: str) -> None:
    src = csv_source(tmp_path / "team")
    prepare_json(runner, str(src), "--name", "keep")
    before = store_files(dermcam_home)
    assert_one_line_error(runner.invoke(app, ["prepare", str(src), "--name", "keep", *args, *SMALL_CACHE]), message)
    assert store_files(dermcam_home) == before


def test_a_folder_of_unknown_shape_is_a_one_line_error(runner, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(runner.invoke(app, ["prepare", str(tmp_path / "empty"), *SMALL_CACHE]),
                          "cannot tell the layout", "--layout")


# External (evaluation-only) sets ----------------------------------------------------------------------

def test_external_set_is_all_test_and_never_trained_on(runner, tmp_path: Path, dermcam_home: Path) -> None:
    report = prepare_json(runner, str(isic_2018(tmp_path / "isic2018")), "--name", "isic2018", "--external")
    manifest = report["manifest"]
    assert manifest["external"] is True and manifest["fractions"] == [0.0, 0.0, 1.0]
    assert set(index_of(report)["split"]) == {"test"}
    assert sum(manifest["counts"]["test"].values()) == report["images"] == 12
    dataset = load_prepared("isic2018")
    assert dataset.external and len(dataset.split("test")[0]) == 12 and len(dataset.split("train")[0]) == 0

    shown = runner.invoke(app, ["data", "show", "isic2018"])
    assert shown.exit_code == 0 and "External set" in shown.stdout and "Layout: isic" in shown.stdout

    result = runner.invoke(app, ["train", "--data", "isic2018", "--backbone", "test_efficientnet",
                                 "--pretrained", "none", "--epochs", "1"])
    assert_one_line_error(result, "isic2018", "--external", "evaluation")
    runs = dermcam_home / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # refused before any run folder exists


# HAM10000: what it was ---------------------------------------------------------------------------------

def test_ham10000_splits_and_columns_are_unchanged(runner, ham_src: Path) -> None:
    table = read_csv(ham_src)
    table.loc[table.index[::5], "lesion_id"] = ""  # some images without a lesion: grouped as before
    table["dataset"] = np.where(table.index % 2, "vidir_modern", "rosendahl")  # the full metadata's column
    write_csv(ham_src, table)
    report = prepare_json(runner, str(ham_src), "--seed", "2")
    manifest = report["manifest"]
    index = index_of(report)
    groups = index["lesion_id"].where(index["lesion_id"] != "", "image:" + index["image_id"])
    expected = split_by_lesion(groups, index["dx"], (0.7, 0.15, 0.15), seed=2)  # the keys HAM always used
    assert index["split"].tolist() == list(expected) and (index["group"] == groups).all()
    assert list(index.columns)[-3:] == NEW_INDEX_COLUMNS and list(manifest)[-7:] == [*NEW_MANIFEST_KEYS, "near_duplicates"]
    assert (index["patient_id"] == "").all()
    assert (index.set_index("image_id")["dataset"] == table.set_index("image_id")["dataset"]).all()
    assert manifest["classes_from"] == "default" and manifest["other_classes"] == {} and not manifest["external"]
    assert manifest["grouping"] == {"lesion": groups[index["lesion_id"] != ""].nunique(), "patient": 0,
                                    "image": (index["lesion_id"] == "").sum()}
    assert set(kinds(report)) == {"missing_lesion_id"}


def test_older_sets_still_load_and_train(runner, ham_src: Path, dermcam_home: Path) -> None:
    report = prepare_json(runner, str(ham_src), "--name", "old", "--cache-size", "32x24")
    folder = Path(report["path"])
    index = index_of(report).drop(columns=NEW_INDEX_COLUMNS)  # as written before issue #13
    (folder / "index.csv").write_text(index.to_csv(index=False, lineterminator="\n"))
    manifest = {k: v for k, v in report["manifest"].items() if k not in NEW_MANIFEST_KEYS}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    dataset = load_prepared("old")
    assert not dataset.external
    assert (dataset.index["group"] == index["lesion_id"].where(index["lesion_id"] != "",
                                                               "image:" + index["image_id"])).all()
    assert (dataset.index[["patient_id", "dataset"]] == "").all().all()
    result = runner.invoke(app, ["train", "--data", "old", "--backbone", "test_efficientnet", "--pretrained", "none",
                                 "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output


def test_a_patient_with_two_lesions_never_sits_on_two_sides() -> None:
    """Grouping is transitive: images linked by a lesion id or a patient id are one group."""
    import pandas as pd

    from dermcam.data.split import group_keys, split_by_lesion

    rows = []
    for p in range(40):
        for lesion in range(3):  # three lesions per patient; one image of each has no patient id
            rows.append({"image_id": f"i{p}-{lesion}a", "lesion_id": f"L{p}-{lesion}", "patient_id": f"P{p}"})
            rows.append({"image_id": f"i{p}-{lesion}b", "lesion_id": f"L{p}-{lesion}", "patient_id": ""})
    table = pd.DataFrame(rows)
    groups = group_keys(table)
    assert groups.nunique() == 40 and (groups == "patient:" + table["patient_id"].where(
        table["patient_id"] != "", "P" + table["lesion_id"].str[1:].str.split("-").str[0])).all()
    splits = split_by_lesion(groups, ["nv"] * len(table), (0.7, 0.15, 0.15), seed=0)
    for column in ("lesion_id", "patient_id"):
        known = table[column] != ""
        sides = pd.Series(splits[known.to_numpy()]).groupby(table.loc[known, column].to_numpy()).nunique()
        assert (sides == 1).all(), column
