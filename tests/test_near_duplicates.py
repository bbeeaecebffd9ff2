"""Near-duplicates in `dermcam prepare` and `dermcam data duplicates`: one photograph filed under two
lesion ids ends in one group and one split, is counted, listed and flagged when its labels differ;
fingerprints are stored, reused, and an old or damaged set says which command fixes it."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.cli import app
from dermcam.data.fingerprint import DEFAULT_THRESHOLD
from dermcam.data.split import group_keys

pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import image_path, read_csv, write_csv  # noqa: E402

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "32x24"]
ORIGINAL = "ISIC_0000020"  # a mel image of the source below; its copy is 0.002 from it
COPY = "ISIC_0099999"


@pytest.fixture(scope="module")
def photo_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic source of 160x120 photos (large enough to crop) in which no two images are near-duplicates."""
    from dermcam.data.synthetic import write_synthetic_ham10000

    return write_synthetic_ham10000(tmp_path_factory.mktemp("photos") / "src", n_lesions_per_class=5,
                                    images_per_lesion=(1, 2), size=(160, 120), seed=2)


@pytest.fixture
def photo_src(photo_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(photo_master, tmp_path / "src"))


def plant_copy(src: Path, original: str = ORIGINAL, copy: str = COPY, dx: str | None = None) -> None:
    """Add ``copy``: ``original`` cropped by 5% (2.5% a side), turned 90 degrees and saved again as a JPEG
    of another quality, under a new lesion id (and ``dx``, else the original's label)."""
    image = Image.open(image_path(src, original)).convert("RGB")
    dx_, dy = round(image.width * 0.025), round(image.height * 0.025)
    turned = image.crop((dx_, dy, image.width - dx_, image.height - dy)).transpose(Image.Transpose.ROTATE_90)
    turned.save(src / "HAM10000_images_part_2" / f"{copy}.jpg", quality=70)
    table = read_csv(src)
    row = table[table["image_id"] == original].assign(image_id=copy, lesion_id="HAM_0099999")
    if dx is not None:
        row = row.assign(dx=dx)
    write_csv(src, pd.concat([table, row], ignore_index=True))


def prepare(runner, src: Path, *args: str, code: int = 0) -> dict:
    result = runner.invoke(app, ["prepare", str(src), *SMALL_CACHE, *args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def rows(report: dict) -> pd.DataFrame:
    return pd.read_csv(Path(report["path"]) / "index.csv", dtype=str, keep_default_na=False).set_index("image_id")


def duplicates(runner, *args: str, code: int = 0) -> dict:
    result = runner.invoke(app, ["data", "duplicates", *args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_a_photo_under_two_lesion_ids_ends_on_one_side_of_the_split(runner, photo_src: Path) -> None:
    plant_copy(photo_src)
    # a seed whose split, by lesion ids alone, puts the two lesions on different sides
    for seed in map(str, range(20)):
        alone = rows(prepare(runner, photo_src, "--seed", seed, "--duplicate-threshold", "0"))
        if alone.loc[ORIGINAL, "split"] != alone.loc[COPY, "split"]:
            break
    else:
        pytest.fail("no seed split the two lesions apart")
    assert alone.loc[ORIGINAL, "group"] != alone.loc[COPY, "group"]

    report = prepare(runner, photo_src, "--seed", seed)
    index = rows(report)
    assert index.loc[ORIGINAL, "split"] == index.loc[COPY, "split"]
    assert index.loc[ORIGINAL, "group"] == index.loc[COPY, "group"] == index.loc[ORIGINAL, "lesion_id"]  # smallest id
    near = report["manifest"]["near_duplicates"]
    assert near == {"threshold": DEFAULT_THRESHOLD, "file": "duplicates.csv", "within_threshold": 1, "pairs": 1,
                    "images": 2, "clusters": 1, "cross_lesion_pairs": 1, "cross_lesion_clusters": 1,
                    "label_conflicts": 0, "groups_merged": 1}
    assert report["manifest"]["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    # every other image keeps its split: only the merged group moved
    others = index.index.difference([ORIGINAL, COPY])
    assert (index.loc[others, "group"] == alone.loc[others, "group"]).all()

    pairs = pd.read_csv(Path(report["path"]) / "duplicates.csv", dtype=str, keep_default_na=False)
    assert list(pairs.columns) == ["cluster", "image_id_a", "image_id_b", "distance", "lesion_id_a", "lesion_id_b",
                                   "dx_a", "dx_b"]
    assert {pairs["image_id_a"][0], pairs["image_id_b"][0]} == {ORIGINAL, COPY}
    assert 0 <= float(pairs["distance"][0]) <= 0.01

    listed = duplicates(runner, "src")
    assert [sorted(i["image_id"] for i in c["images"]) for c in listed["clusters"]] == [sorted([ORIGINAL, COPY])]
    cluster = listed["clusters"][0]
    assert cluster["cross_lesion"] and not cluster["conflict"] and cluster["labels"] == ["mel"]
    assert cluster["split"] == index.loc[ORIGINAL, "split"] and cluster["max_distance"] <= 0.01
    assert listed["summary"] == near


def test_the_summary_says_what_was_found(runner, photo_src: Path) -> None:
    plant_copy(photo_src)
    result = runner.invoke(app, ["prepare", str(photo_src), *SMALL_CACHE])
    assert result.exit_code == 0, result.output
    assert ("Near-duplicates: 1 pair in 1 cluster (1 across lesion ids, 0 label conflicts), kept on one side"
            in " ".join(result.stdout.split()))
    assert "Near-duplicates: 1 pair in 1 cluster" in runner.invoke(app, ["data", "show", "src"]).stdout
    shown = runner.invoke(app, ["data", "duplicates", "src"], env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    assert ORIGINAL in shown.stdout and COPY in shown.stdout and "HAM_0099999" in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80


def test_a_label_conflict_is_flagged(runner, photo_src: Path) -> None:
    plant_copy(photo_src, dx="nv")
    report = prepare(runner, photo_src)
    assert report["manifest"]["near_duplicates"]["label_conflicts"] == 1
    cluster = duplicates(runner, "src")["clusters"][0]
    assert cluster["conflict"] and cluster["labels"] == ["mel", "nv"]
    shown = runner.invoke(app, ["data", "duplicates", "src"])
    assert "label conflict" in shown.stdout


def test_same_lesion_clusters_only_with_all(runner, photo_src: Path) -> None:
    """Two photos of one lesion are expected: listed with --all, not by default."""
    plant_copy(photo_src)
    table = read_csv(photo_src)
    table.loc[table["image_id"] == COPY, "lesion_id"] = table.loc[table["image_id"] == ORIGINAL, "lesion_id"].iloc[0]
    write_csv(photo_src, table)
    report = prepare(runner, photo_src)
    near = report["manifest"]["near_duplicates"]
    assert (near["pairs"], near["cross_lesion_pairs"], near["groups_merged"]) == (1, 0, 0)
    assert duplicates(runner, "src")["clusters"] == []
    both = duplicates(runner, "src", "--all")["clusters"]
    assert len(both) == 1 and not both[0]["cross_lesion"]
    assert "one lesion" in runner.invoke(app, ["data", "duplicates", "src", "--all"]).stdout


def test_without_near_duplicates_the_split_is_unchanged(runner, ham_src: Path) -> None:
    grouped = prepare(runner, ham_src)
    assert grouped["manifest"]["near_duplicates"]["pairs"] == 0
    off = prepare(runner, ham_src, "--duplicate-threshold", "0", "--name", "off")
    assert off["manifest"]["near_duplicates"]["threshold"] == 0
    assert (Path(grouped["path"]) / "index.csv").read_bytes() == (Path(off["path"]) / "index.csv").read_bytes()


def test_unreadable_images_are_skipped_and_the_fingerprints_follow_the_kept_rows(runner, photo_src: Path) -> None:
    from dermcam.data.dataset import load_prepared

    plant_copy(photo_src)
    victim = read_csv(photo_src)["image_id"][0]
    image_path(photo_src, victim).write_bytes(b"not an image")
    report = prepare(runner, photo_src, code=5)
    assert report["manifest"]["problems"] == {"unreadable": 1}
    dataset = load_prepared("src")
    fingerprints = dataset.fingerprints()
    assert fingerprints.shape == (len(dataset.index), 12, 192) and victim not in set(dataset.index["image_id"])
    assert report["manifest"]["near_duplicates"]["cross_lesion_pairs"] == 1  # rows still line up


def test_a_re_prepare_reuses_the_fingerprints(runner, photo_src: Path) -> None:
    first = prepare(runner, photo_src)
    saved = np.load(Path(first["path"]) / "fingerprints.npy", allow_pickle=False)
    again = prepare(runner, photo_src, "--seed", "3")  # rebuilt: rows copied, nothing decoded
    assert not again["up_to_date"] and again["decoded"] == 0 and again["reused"] == first["images"]
    assert np.array_equal(np.load(Path(again["path"]) / "fingerprints.npy", allow_pickle=False), saved)


def test_fingerprints_do_not_depend_on_the_cache_size(runner, photo_src: Path) -> None:
    """A set cached at 32x24 fingerprints what one at 256x192 does (JPEG drafts of at least 128 pixels),
    so two sets prepared at different sizes can be compared."""
    from dermcam.data.dataset import load_prepared

    prepare(runner, photo_src, "--name", "small")
    prepare(runner, photo_src, "--name", "large", "--cache-size", "256x192")
    assert np.array_equal(load_prepared("small").fingerprints(), load_prepared("large").fingerprints())


def make_old(folder: Path) -> None:
    """What a set prepared before fingerprints existed looks like."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("fingerprints", "near_duplicates"):
        del manifest[key]
    manifest["fingerprint"] = "0" * 64  # another version's content hash
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "fingerprints.npy").unlink()
    (folder / "duplicates.csv").unlink()


def test_an_old_set_names_the_command_that_adds_fingerprints(runner, photo_src: Path) -> None:
    from dermcam.data.dataset import load_prepared
    from dermcam.errors import NotFoundError

    folder = Path(prepare(runner, photo_src)["path"])
    make_old(folder)
    result = runner.invoke(app, ["data", "duplicates", "src"])
    command = f"dermcam prepare {photo_src.resolve()} --name src --cache-size 32x24"
    assert result.exit_code == 3 and result.stderr.strip().splitlines() == [
        f"Error: data set 'src' was prepared before near-duplicates were searched; run: {command}"]
    with pytest.raises(NotFoundError, match=rf"^data set 'src': no near-duplicate fingerprints \(prepared before "
                                            rf"they existed\); run: {re.escape(command)}$"):
        load_prepared("src").fingerprints()
    shown = runner.invoke(app, ["data", "show", "src"])  # the rest of the set still reads
    assert shown.exit_code == 0 and "Near-duplicates: not searched" in shown.stdout

    rebuilt = prepare(runner, photo_src)  # the command named: old rows are decoded again, once
    assert not rebuilt["up_to_date"] and rebuilt["decoded"] == rebuilt["images"]
    assert load_prepared("src").fingerprints().shape == (rebuilt["images"], 12, 192)


def _wrong_shape(path: Path) -> None:
    np.save(path, np.zeros((3, 12, 100), np.float16))


def _nan(path: Path) -> None:
    fps = np.load(path)
    fps[0, 0, 0] = np.nan
    np.save(path, fps)


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"not": "an array"}))


def _object_array(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage", [_wrong_shape, _nan, _pickle, _object_array, _truncated],
                         ids=["shape", "nan", "pickle", "object-array", "truncated"])
def test_a_damaged_fingerprint_file_is_one_line_and_prepare_repairs_it(runner, photo_src: Path, damage) -> None:
    from dermcam.data.dataset import load_prepared
    from dermcam.errors import CorruptError

    first = prepare(runner, photo_src)
    damage(Path(first["path"]) / "fingerprints.npy")
    with pytest.raises(CorruptError) as caught:
        load_prepared("src").fingerprints()
    message = str(caught.value)
    assert caught.value.exit_code == 4 and "\n" not in message
    assert message.startswith("data set 'src': fingerprints.npy is damaged")
    assert message.endswith(f"run: dermcam prepare {photo_src.resolve()} --name src --cache-size 32x24")

    again = prepare(runner, photo_src)  # not "up to date": the damaged file is rebuilt, never reused
    assert not again["up_to_date"] and again["decoded"] == again["images"]
    assert np.isfinite(load_prepared("src").fingerprints()).all()


@pytest.mark.parametrize("content", [b"cluster,image_id_a\n1,ISIC_0000000\n", b"\x00\xff\xfe binary",
                                     b"cluster,image_id_a,image_id_b,distance\n1,NOPE,ISIC_0000001,0.01\n",
                                     b"cluster,image_id_a,image_id_b,distance\n1,ISIC_0000001,ISIC_0000002,nan\n"],
                         ids=["columns", "binary", "unknown-id", "nan"])
def test_a_damaged_duplicates_file_is_one_line_exit_4(runner, photo_src: Path, content: bytes) -> None:
    folder = Path(prepare(runner, photo_src)["path"])
    (folder / "duplicates.csv").write_bytes(content)
    result = runner.invoke(app, ["data", "duplicates", "src"])
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "duplicates.csv is damaged" in lines[0] and "run: dermcam prepare" in lines[0]


@pytest.mark.parametrize("value", ["-0.1", "0.5", "nan", "inf", "abc"])
def test_bad_thresholds_exit_2(runner, ham_src: Path, dermcam_home: Path, value: str) -> None:
    result = runner.invoke(app, ["prepare", str(ham_src), "--duplicate-threshold", value])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "--duplicate-threshold" in result.stderr
    assert not (dermcam_home / "datasets").exists() or not any((dermcam_home / "datasets").iterdir())


def test_an_unknown_set_exits_3(runner) -> None:
    result = runner.invoke(app, ["data", "duplicates", "nothing"])
    assert result.exit_code == 3 and "no prepared data set" in result.stderr


def test_group_keys_join_ids_and_pairs_in_one_closure() -> None:
    table = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "lesion_id": ["L2", "L2", "L1", "", ""],
                          "patient_id": ["", "", "", "", "P9"]})
    assert group_keys(table).tolist() == ["L2", "L2", "L1", "image:d", "patient:P9"]
    joined = group_keys(table, np.array([[0, 2], [3, 2]])).tolist()
    assert joined == ["L1", "L1", "L1", "L1", "patient:P9"]  # transitive, keyed by the smallest lesion id
    assert group_keys(table, [(3, 4)]).tolist()[3:] == ["patient:P9", "patient:P9"]
    with pytest.raises(ValueError):
        group_keys(table, [(0, 5)])
