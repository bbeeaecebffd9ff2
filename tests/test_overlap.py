"""Overlap between data sets: an "external" set that holds copies of the training images.

One module store: 'synth' (a synthetic HAM10000-like set) with one tiny checkpoint trained on it, and
'ext', an external set of 12 new images plus 6 copies of synth's training images: 3 byte-identical
files, 3 rotated by 90 degrees and re-encoded (other bytes, same photograph). 'copies' holds only the 6
copies. Each test gets a copy of the store (see ``store``).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import run_json
from test_ensemble import cli  # the CLI at 200 columns
from dermcam.errors import ExitCode

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--epochs", "1"]
EXACT, ROTATED = 3, 3
NEW = 12  # distinct images of the external source (4 lesions per class, one image each)


@dataclass
class Store:
    home: Path
    ext_src: Path
    ckpt: str
    copies: dict[str, str]  # image id in ext -> the synth training image it copies
    exact: set[str]  # the byte-identical ones


def _plant_copies(synth_src: Path, synth_index: pd.DataFrame, dest: Path, new_lesions: int,
                  seed: int) -> dict[str, str]:
    """A synthetic HAM10000 source at ``dest`` with ``new_lesions`` per class plus copies of synth's first
    training images (EXACT as they are, ROTATED turned 90 degrees and saved at JPEG quality 85)."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    if new_lesions:
        write_synthetic_ham10000(dest, n_lesions_per_class=new_lesions, images_per_lesion=(1, 1), seed=seed)
        table = pd.read_csv(dest / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    else:
        (dest / "HAM10000_images_part_1").mkdir(parents=True)
        table = pd.DataFrame(columns=pd.read_csv(synth_src / "HAM10000_metadata.csv", nrows=0).columns)
    meta = pd.read_csv(synth_src / "HAM10000_metadata.csv", dtype=str, keep_default_na=False).set_index("image_id")
    originals = synth_index.loc[synth_index["split"] == "train", "image_id"].head(EXACT + ROTATED).tolist()
    copies, rows = {}, []
    for k, original in enumerate(originals):
        new_id = f"ISIC_98{k:05d}"
        source = next(synth_src.glob(f"HAM10000_images_part_*/{original}.*"))
        target = dest / "HAM10000_images_part_1" / f"{new_id}.jpg"
        if k < EXACT:
            shutil.copyfile(source, target)
        else:
            Image.open(source).transpose(Image.Transpose.ROTATE_90).save(target, quality=85)
        rows.append({**meta.loc[original].to_dict(), "image_id": new_id, "lesion_id": f"HAM_98{k:05d}"})
        copies[new_id] = original
    pd.concat([table, pd.DataFrame(rows)], ignore_index=True).to_csv(dest / "HAM10000_metadata.csv", index=False)
    return copies


@pytest.fixture(scope="module")
def trained(prepared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """conftest's 'synth' with the two external sets beside it and one checkpoint trained on synth."""
    from typer.testing import CliRunner

    from dermcam.data.dataset import load_prepared
    from dermcam.data.prepare import prepare

    base = tmp_path_factory.mktemp("overlap-module")
    root = base / "store"
    shutil.copytree(prepared_store / "datasets", root / "datasets")
    synth = load_prepared("synth", root)
    synth_src = Path(synth.manifest["source"])
    copies = _plant_copies(synth_src, synth.index, base / "ext", new_lesions=NEW // 3, seed=5)
    _plant_copies(synth_src, synth.index, base / "copies", new_lesions=0, seed=0)
    for name in ("ext", "copies"):
        prepare(base / name, name=name, cache_size=(64, 48), external=True, root=root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMCAM_HOME", str(root))
        [run] = run_json(CliRunner(), ["train", *TINY, "--json"])
    exact = {new for k, new in enumerate(copies) if k < EXACT}
    return Store(root, base / "ext", run["best_checkpoint"], copies, exact)


@pytest.fixture
def store(trained: Store, dermcam_home: Path) -> Store:
    """This test's DERMCAM_HOME: a copy of the module's store."""
    shutil.copytree(trained.home, dermcam_home, dirs_exist_ok=True, ignore=shutil.ignore_patterns("report"))
    return replace(trained, home=dermcam_home)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_leaves_out_copies_of_training_images_and_reports_them(runner, store: Store, tmp_path: Path) -> None:
    out = run_json(runner, ["evaluate", store.ckpt, "--data", "ext", "--resamples", "50", "--out",
                            str(tmp_path / "rep"), "--json"])
    overlap = out["overlap"]
    assert overlap["checked"] and overlap["training_set"] == "synth" and overlap["compared_with"] == ["synth"]
    assert (overlap["images"], overlap["excluded"], overlap["exact"]) == (EXACT + ROTATED, EXACT + ROTATED, EXACT)
    assert overlap["compared"] == NEW + EXACT + ROTATED and overlap["by_split"]["train"] == EXACT + ROTATED
    assert not overlap["mostly"] and not overlap["kept"]
    assert out["metrics"]["n"] == NEW  # the metrics are computed on the new images alone
    predictions = read_rows(tmp_path / "rep" / "predictions.csv")
    assert len(predictions) == NEW and not {r["image_id"] for r in predictions} & set(store.copies)
    listed = read_rows(tmp_path / "rep" / "overlap.csv")
    assert {r["image_id"]: r["matched_image_id"] for r in listed} == store.copies  # each found, and found once
    assert {r["image_id"] for r in listed if r["exact"] == "True"} == store.exact
    assert all(r["matched_set"] == "synth" and r["matched_split"] == "train" and r["dx"] == r["matched_dx"]
               for r in listed)
    assert all(float(r["distance"]) <= 0.055 for r in listed)
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["overlap"]["excluded"] == EXACT + ROTATED and saved["n"] == NEW
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert f"{EXACT + ROTATED} of {NEW + EXACT + ROTATED} images are copies of training images" in page
    assert "left out of every metric here" in page

    human = cli(runner, "evaluate", store.ckpt, "--data", "ext", "--resamples", "0")
    assert human.exit_code == 0, human.output
    [line] = [x for x in human.stdout.splitlines() if x.startswith("Overlap with training set")]
    assert f"{EXACT + ROTATED} of {NEW + EXACT + ROTATED} images" in line and "left out of every metric" in line

    kept = run_json(runner, ["evaluate", store.ckpt, "--data", "ext", "--resamples", "0", "--keep-overlap",
                             "--out", str(tmp_path / "kept"), "--json"])
    assert kept["metrics"]["n"] == NEW + EXACT + ROTATED
    assert (kept["overlap"]["images"], kept["overlap"]["excluded"], kept["overlap"]["kept"]) == (6, 0, True)
    assert len(read_rows(tmp_path / "kept" / "overlap.csv")) == EXACT + ROTATED
    assert "kept in every metric (--keep-overlap)" in (tmp_path / "kept" / "report.html").read_text(encoding="utf-8")
    # dermcam report does not reuse an evaluation that kept the copies: it evaluates again, leaving them out
    regenerated = run_json(runner, ["report", store.ckpt, "--data", "ext", "--out", str(tmp_path / "kept"), "--json"])
    assert regenerated["evaluated"] and json.loads((tmp_path / "kept" / "metrics.json").read_text())["n"] == NEW
    again = run_json(runner, ["report", store.ckpt, "--data", "ext", "--out", str(tmp_path / "kept"), "--json"])
    assert not again["evaluated"]  # now it is the current, default evaluation

    exact_only = run_json(runner, ["evaluate", store.ckpt, "--data", "ext", "--resamples", "0",
                                   "--overlap-threshold", "0", "--json"])
    assert exact_only["overlap"]["images"] == EXACT and exact_only["metrics"]["n"] == NEW + ROTATED

    # on its own set there is nothing to compare: the split already keeps copies on one side
    own = run_json(runner, ["evaluate", store.ckpt, "--resamples", "0", "--out", str(tmp_path / "rep"), "--json"])
    assert own["overlap"]["compared_with"] == [] and not own["overlap"]["checked"] and own["overlap"]["reason"]
    assert not (tmp_path / "rep" / "overlap.csv").exists()  # the earlier evaluation's list is not left behind


def test_an_ensemble_is_compared_with_the_sets_its_members_learned_from(runner, store: Store) -> None:
    assert cli(runner, "ensemble", "create", "solo", store.ckpt).exit_code == 0
    out = run_json(runner, ["evaluate", "ensemble:solo", "--data", "ext", "--resamples", "0", "--json"])
    assert out["overlap"]["compared_with"] == ["synth"] and out["overlap"]["excluded"] == EXACT + ROTATED
    assert out["metrics"]["n"] == NEW


def test_a_set_that_is_all_copies_has_nothing_left_to_score(runner, store: Store) -> None:
    result = cli(runner, "evaluate", store.ckpt, "--data", "copies", "--resamples", "0")
    assert result.exit_code == ExitCode.BAD_INPUT and "nothing left to score" in result.output
    assert "--keep-overlap" in result.output and "Traceback" not in result.output
    kept = cli(runner, "evaluate", store.ckpt, "--data", "copies", "--resamples", "0", "--keep-overlap", "--json")
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["overlap"]["mostly"]
    [line] = [x for x in kept.stderr.splitlines() if "mostly measures" in x]
    assert "6 of 6 images of copies/test (100%" in line


def test_a_training_set_missing_from_the_store_is_a_warning(runner, store: Store) -> None:
    shutil.rmtree(store.home / "datasets" / "synth")
    result = cli(runner, "evaluate", store.ckpt, "--data", "ext", "--resamples", "0", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert not out["overlap"]["checked"] and "synth" in out["overlap"]["unchecked"]
    assert out["metrics"]["n"] == NEW + EXACT + ROTATED  # nothing could be excluded
    [line] = [x for x in result.stderr.splitlines() if "not checked" in x]
    assert "'synth'" in line and "not in this store" in line


@pytest.mark.parametrize(("damage", "code"), [("old", ExitCode.NOT_FOUND), ("damaged", ExitCode.CORRUPT)])
def test_a_set_without_usable_fingerprints_names_the_prepare_command(runner, store: Store, damage: str,
                                                                      code: ExitCode) -> None:
    folder = store.home / "datasets" / "ext"
    if damage == "old":  # as prepared before fingerprints existed
        (folder / "fingerprints.npy").unlink()
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["fingerprints"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        (folder / "fingerprints.npy").write_bytes(b"not an array")
    for args in (["evaluate", store.ckpt, "--data", "ext", "--resamples", "0"], ["data", "overlap", "ext", "synth"]):
        result = cli(runner, *args)
        assert result.exit_code == code, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert "run: dermcam prepare" in result.output and "--name ext --external" in result.output
    # byte-identical copies need no fingerprints: the check still runs at threshold 0
    out = run_json(runner, ["evaluate", store.ckpt, "--data", "ext", "--resamples", "0", "--overlap-threshold", "0",
                            "--json"])
    assert out["overlap"]["images"] == EXACT


def test_data_overlap_lists_the_copies_between_two_sets(runner, store: Store) -> None:
    out = run_json(runner, ["data", "overlap", "ext", "synth", "--json"])
    assert (out["name"], out["other"], out["images"], out["exact"]) == ("ext", "synth", EXACT + ROTATED, EXACT)
    assert out["by_split"] == {"train": EXACT + ROTATED, "val": 0, "test": 0} and out["compared"] == NEW + 6
    assert {p["image_id"]: p["matched_image_id"] for p in out["pairs"]} == store.copies
    back = run_json(runner, ["data", "overlap", "synth", "ext", "--json"])  # the other way round
    assert back["images"] == EXACT + ROTATED and back["by_split"]["test"] == EXACT + ROTATED
    assert {p["image_id"] for p in back["pairs"]} == set(store.copies.values())
    human = cli(runner, "data", "overlap", "ext", "synth")
    assert human.exit_code == 0, human.output
    assert f"{EXACT + ROTATED} of {NEW + 6} images of ext have a copy in synth ({EXACT} byte-identical" in human.stdout
    assert human.stdout.count("same file") == EXACT and all(i in human.stdout for i in store.copies)
    assert run_json(runner, ["data", "overlap", "ext", "synth", "--threshold", "0", "--json"])["images"] == EXACT
    mostly = cli(runner, "data", "overlap", "copies", "synth")
    assert mostly.exit_code == 0 and "Most of copies is in synth" in mostly.stdout


@pytest.mark.parametrize(("args", "words"), [
    (["synth", "synth"], "compared with itself"),
    (["ext", "synth", "--threshold", "0.5"], "--threshold must be a number from 0"),
    (["ext", "nosuchset"], "no prepared data set named 'nosuchset'"),
])
def test_data_overlap_refuses_what_it_cannot_compare(runner, store: Store, args: list[str], words: str) -> None:
    result = cli(runner, "data", "overlap", *args)
    assert result.exit_code in (ExitCode.BAD_INPUT, ExitCode.NOT_FOUND) and words in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_prepare_external_reports_overlap_with_the_sets_of_the_store(runner, store: Store) -> None:
    result = cli(runner, "prepare", store.ext_src, "--name", "ext", "--external", "--cache-size", "64x48")
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.stdout.splitlines() if x.startswith("Overlap:")]
    assert f"{EXACT + ROTATED} of {NEW + 6} images of ext are in synth ({EXACT} byte-identical; train 6)" in line
    out = run_json(runner, ["prepare", str(store.ext_src), "--name", "ext", "--external", "--cache-size", "64x48",
                            "--json"])
    assert out["overlap"]["compared"] == ["synth"]  # not 'copies': an external set is never trained on
    [found] = out["overlap"]["overlaps"]
    assert (found["other"], found["images"], found["exact"]) == ("synth", EXACT + ROTATED, EXACT)
