"""`dermcam data list|show|synthetic` and the Python API training uses (load_prepared, split)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermcam.cli import app
from dermcam.data.dataset import list_prepared, load_prepared
from dermcam.data.prepare import prepare
from dermcam.errors import CorruptError, NotFoundError

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master


def prepared(src: Path, name: str) -> Path:
    return prepare(src, name=name, cache_size=(32, 24)).path


def test_list_when_empty(runner) -> None:
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0 and "No prepared data sets" in result.stdout
    result = runner.invoke(app, ["data", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_list_shows_every_set(runner, ham_src: Path, dermcam_home: Path) -> None:
    prepared(ham_src, "alpha")
    prepared(ham_src, "beta")
    prepare(ham_src, name="beta", cache_size=(32, 24), seed=1)  # replacing leaves no build/retired folders
    assert sorted(p.name for p in (dermcam_home / "datasets").iterdir()) == ["alpha", "beta"]
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0 and "alpha" in result.stdout and "beta" in result.stdout
    listed = json.loads(runner.invoke(app, ["data", "list", "--json"]).stdout)
    assert [m["name"] for m in listed] == ["alpha", "beta"]
    assert listed[0]["schema"] == "dermcam.dataset/1" and Path(listed[0]["path"]).is_dir()


def test_show_renders_splits_audit_and_problems(runner, ham_src: Path) -> None:
    path = prepared(ham_src, "alpha")
    result = runner.invoke(app, ["data", "show", "alpha"])
    assert result.exit_code == 0
    for text in ("alpha", "Splits (grouped: no lesion or patient on two sides)", "train/val 0", "No problems found", str(ham_src.resolve())):
        assert text in result.stdout
    shown = json.loads(runner.invoke(app, ["data", "show", "alpha", "--json"]).stdout)
    assert shown == {**json.loads((path / "manifest.json").read_text()), "path": str(path)}


def test_show_unknown_name_lists_the_available_ones(runner, ham_src: Path) -> None:
    prepared(ham_src, "alpha")
    result = runner.invoke(app, ["data", "show", "nope"])
    assert result.exit_code == 3 and "nope" in result.stderr and "alpha" in result.stderr


def test_damaged_cache_exits_4(runner, ham_src: Path) -> None:
    path = prepared(ham_src, "alpha")
    cache = path / "images.npy"
    cache.write_bytes(cache.read_bytes()[:1000])
    result = runner.invoke(app, ["data", "show", "alpha"])
    assert result.exit_code == 4 and "damaged" in result.stderr
    with pytest.raises(CorruptError):
        load_prepared("alpha")


def test_load_prepared_gives_memory_mapped_images_and_splits(ham_src: Path) -> None:
    with pytest.raises(NotFoundError, match="dermcam prepare"):
        load_prepared()
    prepared(ham_src, "alpha")
    dataset = load_prepared()  # the only set
    assert dataset.name == "alpha" and dataset.classes == ["bkl", "mel", "nv"]
    assert isinstance(dataset.images, np.memmap) and not dataset.images.flags.writeable
    assert dataset.fingerprint == dataset.manifest["fingerprint"]
    seen = []
    for split in ("train", "val", "test"):
        rows, labels = dataset.split(split)
        assert (dataset.index["split"].to_numpy()[rows] == split).all()
        assert np.array_equal(labels, dataset.index["label"].to_numpy()[rows]) and labels.dtype == np.int64
        assert len(rows) == sum(dataset.manifest["counts"][split].values())
        seen += list(rows)
    assert sorted(seen) == list(range(len(dataset.index)))


def test_load_prepared_without_name_takes_the_most_recent(ham_src: Path, dermcam_home: Path) -> None:
    prepared(ham_src, "newer")
    old = prepared(ham_src, "older")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00+00:00"
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert load_prepared().name == "newer"
    assert [m["name"] for m in list_prepared()] == ["newer", "older"]


def test_synthetic_command_writes_the_kaggle_layout(runner, tmp_path: Path) -> None:
    dest = tmp_path / "synth"
    args = ["data", "synthetic", str(dest), "--lesions-per-class", "3", "--size", "40x30", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    table = pd.read_csv(dest / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert out["images"] == len(table) and set(table["dx"]) == {"nv", "bkl", "mel"}
    assert table.groupby("dx")["lesion_id"].nunique().to_dict() == {"bkl": 3, "mel": 3, "nv": 3}
    files = sorted(dest.glob("HAM10000_images_part_[12]/*.jpg"))
    assert sorted(f.stem for f in files) == sorted(table["image_id"])
    assert {f.parent.name for f in files} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    first = {f.name: f.read_bytes() for f in files}
    assert runner.invoke(app, [*args[:2], str(tmp_path / "again"), *args[3:]]).exit_code == 0
    assert first == {f.name: f.read_bytes() for f in (tmp_path / "again").glob("HAM10000_images_part_[12]/*.jpg")}


def test_synthetic_rejects_unknown_classes(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synthetic", str(tmp_path / "x"), "--classes", "nv,zzz"])
    assert result.exit_code == 2 and "zzz" in result.stderr


def test_synthetic_classes_are_learnable(tmp_path: Path) -> None:
    """Even a nearest-centroid rule on colour statistics tells the classes apart on unseen lesions."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    src = write_synthetic_ham10000(tmp_path / "s", n_lesions_per_class=12, size=(48, 36), seed=11)
    dataset = load_prepared(prepared(src, "learn").name)

    def features(rows: np.ndarray) -> np.ndarray:
        centre = (dataset.images[rows, 4:20, 6:26].astype(np.float32) / 255).reshape(len(rows), -1, 3)
        quantiles = np.quantile(centre, [0.1, 0.5], axis=1).transpose(1, 0, 2).reshape(len(rows), -1)
        return np.concatenate([quantiles, centre.std(1)], axis=1)

    train, y_train = dataset.split("train")
    held = np.concatenate([dataset.split("val")[0], dataset.split("test")[0]])
    y_held = dataset.index["label"].to_numpy()[held]
    f_train, f_held = features(train), features(held)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    centroids = np.stack([((f_train - mean) / std)[y_train == k].mean(0) for k in range(3)])
    distances = ((((f_held - mean) / std)[:, None] - centroids[None]) ** 2).sum(-1)
    predicted = np.argmin(distances, axis=1)
    assert (predicted == y_held).mean() > 0.7  # chance is 1/3


def test_list_at_80_columns_cuts_no_name_or_folder_in_two(runner, synthetic_master: Path, tmp_path: Path) -> None:
    """A long name and a deep source at 80 columns: the source goes under the name and breaks only after
    a separator, so every folder name is whole on one line (before, both were folded mid-word)."""
    src = Path(shutil.copytree(synthetic_master, tmp_path / "dermatology-study-2026" / "raw-images-from-the-clinic"
                               / "exported-for-training" / "ham10000-synthetic-copy"))
    name = "ham10000-synthetic-balanced-subset"
    prepare(src, name=name, cache_size=(32, 24))
    prepared(src, "short")
    result = runner.invoke(app, ["data", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert sum(name in line for line in lines) == 1 and sum("short" in line for line in lines) == 1
    for folder in src.relative_to(tmp_path).parts:  # each folder of the source whole on a line, for both sets
        assert sum(f"{folder}{os.sep}" in line or line.rstrip().endswith(folder) for line in lines) == 2, folder
    assert "…" not in result.stdout  # 80 columns leave room for the whole path: nothing is left out
    rows = [line for line in lines if "32x24" in line]
    assert len(rows) == 2
    for row in rows:  # the classes and the date and time of creation whole on the row's line
        assert re.search(r" bkl,mel,nv 32x24 \d{4}-\d\d-\d\d \d\d:\d\d$", row.rstrip()), row


def test_a_source_too_long_for_its_column_keeps_its_end() -> None:
    """In a column narrower than one of its folders, a source shows its end after '…' (data show has it whole)."""
    from dermcam.cli.views import WrapAt

    source = WrapAt("/data/dermatology-study-2026/ham10000")
    assert source.lines(80) == ["/data/dermatology-study-2026/ham10000"]
    assert source.lines(24) == ["/data/", "dermatology-study-2026/", "ham10000"]
    assert source.lines(12) == ["…/ham10000"]
    assert WrapAt("bkl,mel,nv", ",").lines(8) == ["bkl,mel,", "nv"]
