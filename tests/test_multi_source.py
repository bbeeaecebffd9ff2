"""Several sources in one data set (issue 22): `dermcam prepare HAM ISIC --name combined` counts an image
found in both sources once, keeps near-duplicates of one another on one side of the split, records each
row's source, merges classes by name, and evaluate's subgroup table shows each source. Tiny synthetic
layouts with planted shared images, through the CLI runner."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.cli import app
from dermcam.data.synthetic import write_synthetic_ham10000

pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import image_path, read_csv, write_csv  # noqa: E402

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "16x12"]
CODES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def write_isic_2019(dest: Path, rows: list[tuple[str, str, str, bytes]]) -> Path:
    """An ISIC 2019 style source: one-hot ground truth (upper-case codes), metadata with lesion ids,
    images one folder down. ``rows``: (image_id, CODE, lesion_id, jpeg bytes)."""
    images = dest / "ISIC_2019_Training_Input"
    images.mkdir(parents=True)
    with (dest / "ISIC_2019_Training_GroundTruth.csv").open("w", newline="") as truth, \
            (dest / "ISIC_2019_Training_Metadata.csv").open("w", newline="") as meta:
        t, m = csv.writer(truth, lineterminator="\n"), csv.writer(meta, lineterminator="\n")
        t.writerow(["image", *CODES])
        m.writerow(["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])
        for image_id, code, lesion, data in rows:
            t.writerow([image_id] + ["1.0" if c == code else "0.0" for c in CODES])
            m.writerow([image_id, "50", "back", lesion, "female"])
            (images / f"{image_id}.jpg").write_bytes(data)
    return dest


def reencoded(path: Path, scale: float = 1.25, quality: int = 80) -> bytes:
    """The image at ``path`` resized and saved again: the same photograph, other bytes."""
    with Image.open(path) as image:
        size = (round(image.width * scale), round(image.height * scale))
        out = io.BytesIO()
        image.convert("RGB").resize(size, Image.LANCZOS).save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A HAM10000 source and an ISIC 2019 source sharing planted images (built once, read-only):
    ``identical`` (the same file, same id, as ISIC 2019 holds HAM10000), ``resized`` (re-encoded at
    1.25x under another id), ``conflict`` (the same file under another label), ``collision`` (another
    image under an id the HAM source also uses)."""
    base = tmp_path_factory.mktemp("multi")
    ham = write_synthetic_ham10000(base / "HAM10000", n_lesions_per_class=6, images_per_lesion=(1, 2),
                                   size=(48, 36), seed=7)
    other = write_synthetic_ham10000(base / "other", n_lesions_per_class=5, images_per_lesion=(1, 1),
                                     size=(48, 36), seed=23)
    ham_rows = read_csv(ham)
    ham_rows["dataset"] = ["vidir_modern", "rosendahl"] * (len(ham_rows) // 2) + ["vidir_modern"] * (len(ham_rows) % 2)
    write_csv(ham, ham_rows)
    by_dx = {dx: rows["image_id"].tolist() for dx, rows in ham_rows.groupby("dx")}
    planted = {"identical": by_dx["mel"][0], "resized": by_dx["nv"][0], "conflict": by_dx["bkl"][0]}
    rows = []
    for n, r in enumerate(read_csv(other).itertuples()):  # ISIC's own images, with ids HAM does not use
        data = image_path(other, r.image_id).read_bytes()
        rows.append((f"ISIC_{9000000 + n:07d}", r.dx.upper(), f"IL_{n:07d}", data))
    collision = rows[0]
    rows[0] = (ham_rows["image_id"].iloc[-1], *collision[1:])  # another image under a HAM image's id
    rows += [(planted["identical"], "MEL", "HAM_x", image_path(ham, planted["identical"]).read_bytes()),
             ("ISIC_9100000", "NV", "IL_9100000", reencoded(image_path(ham, planted["resized"]))),
             ("ISIC_9100001", "MEL", "IL_9100001", image_path(ham, planted["conflict"]).read_bytes())]
    isic = write_isic_2019(base / "ISIC2019", rows)
    return {"ham": ham, "isic": isic, "collision": rows[0][0], "isic_own": len(rows) - 3, "ham_images": len(ham_rows),
            **planted}


def prepare(runner, *args: str, code: int = 0) -> dict:
    result = runner.invoke(app, ["prepare", *args, *SMALL_CACHE, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def files_of(report: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = Path(report["path"])
    read = {"dtype": str, "keep_default_na": False}
    return pd.read_csv(folder / "index.csv", **read), pd.read_csv(folder / "problems.csv", **read)


def test_two_sources_count_each_image_once_and_group_the_copies(runner, sources: dict) -> None:
    report = prepare(runner, str(sources["ham"]), str(sources["isic"]), "--name", "combined", code=5)
    index, problems = files_of(report)
    manifest = report["manifest"]

    # each row's source; HAM's own acquisition value kept beside it
    assert sorted(index["dataset"].unique()) == ["ham10000", "isic2019"]
    assert set(index.loc[index["dataset"] == "ham10000", "acquisition"]) == {"vidir_modern", "rosendahl"}
    assert set(index.loc[index["dataset"] == "isic2019", "acquisition"]) == {""}
    assert list(index["source"].str.split("/").str[0]) == list(index["dataset"])
    # classes merged by name: HAM's mel and ISIC's MEL column are one class
    assert manifest["classes"] == ["bkl", "mel", "nv"]
    assert set(index.loc[index["dataset"] == "isic2019", "dx"]) == {"bkl", "mel", "nv"}

    # no image counted twice: the identical file and the resized copy stay once, from HAM10000
    kinds = {k: sorted(rows["file"]) for k, rows in problems.groupby("kind")}
    copies = problems[problems["kind"] == "duplicate_across_sources"]
    assert sorted(copies["image_id"]) == sorted([sources["identical"], "ISIC_9100000"]), kinds
    assert (copies["action"] == "fixed").all() and copies["file"].str.startswith("isic2019/").all()
    assert "ham10000/" in copies.loc[copies["image_id"] == "ISIC_9100000", "detail"].iloc[0]
    assert index["sha256"].is_unique and index["image_id"].is_unique
    # the same file under two labels: no one can tell which is right, both left out (exit 5)
    conflict = problems[problems["kind"] == "conflicting_labels"]
    assert sorted(conflict["file"].str.split("/").str[0]) == ["ham10000", "isic2019"]
    assert sources["conflict"] not in set(index["image_id"]) and "ISIC_9100001" not in set(index["image_id"])
    assert len(index) == sources["ham_images"] - 1 + sources["isic_own"]

    # the same id for two different images: both kept, namespaced by source (only those)
    collided = index[index["image_id"].str.endswith(sources["collision"])]
    assert sorted(collided["image_id"]) == [f"ham10000:{sources['collision']}", f"isic2019:{sources['collision']}"]
    assert (~index["image_id"].str.contains(":")).sum() == len(index) - 2

    # summary counts
    assert [(s["name"], s["images"]) for s in manifest["sources"]] == [
        ("ham10000", sources["ham_images"] - 1), ("isic2019", sources["isic_own"])]
    assert manifest["across_sources"]["identical_files"] == 1
    assert manifest["across_sources"]["near_duplicates_removed"] == 1
    assert manifest["leakage"] == {"train/val": 0, "train/test": 0, "val/test": 0}

    shown = runner.invoke(app, ["data", "show", "combined"])
    assert shown.exit_code == 0, shown.output
    assert f"Sources (index.csv column dataset): ham10000 {sources['ham_images'] - 1}, isic2019" in shown.stdout
    assert "Across sources: 1 identical files and 1 near-duplicates counted once" in shown.stdout


def test_a_copy_in_the_first_source_keeps_its_partners_on_one_side(runner, sources: dict, tmp_path: Path) -> None:
    """A later source's image near-identical to an earlier one's is left out, but what it joined stays joined:
    a second ISIC image of the copied lesion (same lesion id as the copy) lands on the HAM image's side."""
    isic = Path(shutil.copytree(sources["isic"], tmp_path / "isic2019"))
    truth = pd.read_csv(isic / "ISIC_2019_Training_GroundTruth.csv", dtype=str)
    meta = pd.read_csv(isic / "ISIC_2019_Training_Metadata.csv", dtype=str, keep_default_na=False)
    friends = []
    for seed in range(6):  # other photos of the lesion the resized copy belongs to (IL_9100000)
        image_id = f"ISIC_920{seed:04d}"
        truth.loc[len(truth)] = [image_id] + ["1.0" if c == "NV" else "0.0" for c in CODES]
        meta.loc[len(meta)] = [image_id, "50", "back", "IL_9100000", "male"]
        pixels = np.random.default_rng(seed).integers(0, 255, (36, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(isic / "ISIC_2019_Training_Input" / f"{image_id}.jpg", quality=90)
        friends.append(image_id)
    truth.to_csv(isic / "ISIC_2019_Training_GroundTruth.csv", index=False)
    meta.to_csv(isic / "ISIC_2019_Training_Metadata.csv", index=False)
    for seed in range(5):
        report = prepare(runner, str(sources["ham"]), str(isic), "--name", "combined", "--seed", str(seed), code=5)
        index, _ = files_of(report)
        side = index.set_index("image_id")["split"]
        assert "ISIC_9100000" not in side.index and set(friends) <= set(side.index)
        assert set(side[friends]) == {side[sources["resized"]]}, seed


def test_rerunning_reuses_the_set_and_a_changed_source_rebuilds(runner, sources: dict, tmp_path: Path) -> None:
    ham = Path(shutil.copytree(sources["ham"], tmp_path / "HAM10000"))
    first = prepare(runner, str(ham), str(sources["isic"]), "--name", "combined", code=5)
    again = prepare(runner, str(ham), str(sources["isic"]), "--name", "combined", code=5)
    assert again["up_to_date"] and again["manifest"]["fingerprint"] == first["manifest"]["fingerprint"]
    # the second source's order matters (its copies are the ones left out): another set, not a reuse
    swapped = prepare(runner, str(sources["isic"]), str(ham), "--name", "combined", code=5)
    assert not swapped["up_to_date"]
    copies = pd.read_csv(Path(swapped["path"]) / "problems.csv", dtype=str).query("kind == 'duplicate_across_sources'")
    assert copies["file"].str.startswith("ham10000/").all()
    # a changed image in the first source changes the fingerprint
    changed_file = image_path(ham, read_csv(ham)["image_id"].iloc[3])
    changed_file.write_bytes(reencoded(changed_file, 1.0, 60))
    changed = prepare(runner, str(ham), str(sources["isic"]), "--name", "combined", code=5)
    assert not changed["up_to_date"] and changed["reused"] > 0


def test_team_lesion_ids_are_namespaced_but_archive_ids_are_shared(runner, tmp_path: Path) -> None:
    """Two teams' CSVs both call a lesion "L1": two lesions. ISIC archive ids (HAM_..., IL_...) name one lesion
    in every source, so they are left as they are."""
    for team, seed in (("team_a", 1), ("team_b", 2)):
        rows = []
        for n in range(9):
            dx = ["mel", "nv", "bkl"][n % 3]
            path = tmp_path / team / "images" / f"img_{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(seed * 100 + n).integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            rows.append({"path": f"images/img_{n}.jpg", "label": dx, "lesion": f"L{n}"})
        pd.DataFrame(rows).to_csv(tmp_path / team / "labels.csv", index=False)
    report = prepare(runner, str(tmp_path / "team_a"), str(tmp_path / "team_b"), "--name", "teams")
    index, _ = files_of(report)
    assert set(index["lesion_id"].str.split(":").str[0]) == {"team_a", "team_b"}
    assert index["group"].nunique() == len(index)  # 18 lesions, none joined across teams
    assert index["image_id"].str.startswith(("team_a:", "team_b:")).all()  # every id is in both


@pytest.mark.parametrize("case, needle, code", [
    ("missing", "does not exist", 3), ("no_name", "--name", 2), ("twice", "given twice", 2)])
def test_bad_sources_fail_in_one_line_before_any_work(runner, sources: dict, tmp_path: Path, dermcam_home: Path,
                                                      case: str, needle: str, code: int) -> None:
    args = {"missing": [str(sources["ham"]), str(tmp_path / "ISIC2019-typo"), "--name", "combined"],
            "no_name": [str(sources["ham"]), str(sources["isic"])],
            "twice": [str(sources["ham"]), str(sources["ham"]), "--name", "combined"]}[case]
    result = runner.invoke(app, ["prepare", *args, *SMALL_CACHE])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output
    assert "Hashing" not in result.output and not (dermcam_home / "datasets").exists()


def test_evaluate_shows_one_subgroup_per_source(runner, sources: dict) -> None:
    """evaluate's ``source`` subgroups read the ``dataset`` column: one entry per source."""
    from dermcam.data.dataset import load_prepared
    from dermcam.evaluate.subgroups import subgroup_metrics

    prepare(runner, str(sources["ham"]), str(sources["isic"]), "--name", "combined", code=5)
    data = load_prepared("combined")
    rng = np.random.default_rng(0)
    labels = data.index["label"].to_numpy()
    probs = rng.dirichlet(np.ones(3), len(labels))
    entries = subgroup_metrics(labels, probs, data.index, data.index["group"], data.classes, min_images=5,
                               resamples=20)
    source = [e for e in entries if e["title"] == "source"]
    assert [(e["value"], e["n"]) for e in source] == [
        ("ham10000", sources["ham_images"] - 1), ("isic2019", sources["isic_own"])]
