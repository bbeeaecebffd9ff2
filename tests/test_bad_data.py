"""Bad data is reported, not trusted (issue #12 section 5): every bad input gives a one-line error
(exit 2) or a listed skip in problems.csv, never a traceback, and never damages what is stored."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.cli import app
from dermcam.data.images import decode_image, load_image
from dermcam.data.prepare import prepare
from dermcam.errors import BadInputError

pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import CSV, image_path, read_csv, write_csv

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "32x24"]
EXIT_CODES = {0, 2, 3, 4, 5}


def run_prepare(runner, src: Path, *args: str):
    """``dermcam prepare --json``; asserts the run ended without a traceback."""
    result = runner.invoke(app, ["prepare", str(src), *SMALL_CACHE, "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def problems_of(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "problems.csv", dtype=str, keep_default_na=False)


def store_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: a prepared set must stay byte-for-byte the same."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. Spellings of "no value" ---------------------------------------------------------------------------

MISSING_SPELLINGS = ["NaN", "nan", " NA ", "N/A", "None", "null", "NULL", ""]


def test_nan_spellings_of_lesion_id_are_missing_ids_not_one_lesion(runner, ham_src: Path) -> None:
    table = read_csv(ham_src)
    victims = table.groupby("dx").head(4).index  # 4 images of each class, 12 in all
    spellings = [MISSING_SPELLINGS[i % len(MISSING_SPELLINGS)] for i in range(len(victims))]
    table.loc[victims, "lesion_id"] = spellings
    table.loc[victims, "age"] = "nan"
    table.loc[victims, "sex"] = "None"
    table.loc[victims, "localization"] = " N/A"
    write_csv(ham_src, table)
    result = run_prepare(runner, ham_src)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    folder = Path(report["path"])

    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False).set_index("image_id")
    ids = table.loc[victims, "image_id"]
    assert (index.loc[ids, ["lesion_id", "age", "sex", "localization"]] == "").all().all()
    assert index.loc[ids, "split"].nunique() > 1  # not one giant lesion "nan" in a single split
    missing = problems_of(folder).query("kind == 'missing_lesion_id'")
    assert sorted(missing["image_id"]) == sorted(ids) and set(missing["action"]) == {"fixed"}
    lesions = table.drop(index=victims)["lesion_id"].nunique() + len(victims)  # each its own lesion
    assert sum(report["manifest"]["lesions"].values()) == lesions


# 3a. Header problems -----------------------------------------------------------------------------------

@pytest.mark.parametrize("column", ["DX", " dx ", "dx"])
def test_columns_that_collide_ignoring_case_are_a_one_line_error(runner, ham_src: Path, column: str) -> None:
    text = (ham_src / CSV).read_text()
    header, rest = text.split("\n", 1)
    rows = [f"{line},{line.split(',')[2]}" for line in rest.splitlines()]  # dx is the third column
    (ham_src / CSV).write_text("\n".join([f"{header},{column}", *rows]) + "\n")
    assert_one_line_error(run_prepare(runner, ham_src), "'dx'", "more than once")


def test_rows_with_an_extra_field_are_refused_not_shifted(runner, ham_src: Path) -> None:
    lines = (ham_src / CSV).read_text().splitlines()
    (ham_src / CSV).write_text("\n".join([lines[0], *(f"{line},x" for line in lines[1:])]) + "\n")
    assert_one_line_error(run_prepare(runner, ham_src), "not a valid CSV file")


# 2. Header dimensions over the pixel cap ----------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (no pixel data at all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_oversized_images_are_skipped_before_decoding(runner, ham_src: Path) -> None:
    ids = read_csv(ham_src)["image_id"][:2]
    claims = {ids[0]: (9000, 8000), ids[1]: (20000, 20000)}  # 72 MP (ours), 400 MP (also Pillow's own cap)
    for image_id, (width, height) in claims.items():
        path = image_path(ham_src, image_id)
        path.unlink()
        path.with_suffix(".png").write_bytes(png_header_only(width, height))
    result = run_prepare(runner, ham_src)
    assert result.exit_code == 5, result.output
    report = json.loads(result.stdout)
    problems = problems_of(Path(report["path"])).set_index("image_id")
    for image_id in claims:  # "unreadable" would mean decoding was tried: the files have no pixel data
        assert problems.loc[image_id, "kind"] == "too_large" and problems.loc[image_id, "action"] == "skipped"
    assert "9000x8000 pixels is over the 64 MP limit" in problems.loc[ids[0], "detail"]
    assert report["images"] == len(read_csv(ham_src)) - 2


def test_decode_and_load_share_the_pixel_cap(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(9000, 8000))
    with pytest.raises(BadInputError, match="9000x8000 pixels is over") as decoded:
        decode_image(path, (32, 24))
    assert decoded.value.kind == "too_large"
    with pytest.raises(BadInputError, match=f"{path.name}: 9000x8000 pixels is over"):
        load_image(path)


# 3b. Symlink loops, broken links, folders named like images ---------------------------------------------

def test_source_that_is_a_symlink_loop_is_a_one_line_error(runner, tmp_path: Path, dermcam_home: Path) -> None:
    loop = tmp_path / "src"
    loop.symlink_to(loop)
    assert_one_line_error(run_prepare(runner, loop), "symlink loop")
    assert not (dermcam_home / "datasets").exists() or not any((dermcam_home / "datasets").iterdir())


def test_image_folder_linking_back_to_the_source_is_harmless(runner, ham_src: Path) -> None:
    (ham_src / "images").symlink_to(ham_src, target_is_directory=True)
    result = run_prepare(runner, ham_src)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == len(read_csv(ham_src))


def test_links_and_folders_with_image_names_are_listed_not_crashed_on(runner, ham_src: Path) -> None:
    folder = ham_src / "HAM10000_images_part_1"
    victim = read_csv(ham_src)["image_id"][0]
    path = image_path(ham_src, victim)
    path.unlink()
    path.symlink_to(folder / "nowhere.jpg")  # a listed image is now a broken link
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "x.jpg").mkdir()
    result = run_prepare(runner, ham_src)
    assert result.exit_code == 5, result.output
    problems = problems_of(Path(json.loads(result.stdout)["path"]))
    unreadable = problems.query("kind == 'unreadable'")
    assert sorted(unreadable["image_id"]) == sorted([victim, "loop", "x"])
    assert set(unreadable["action"]) == {"skipped"}
    assert problems.query("kind == 'missing_image'")["image_id"].tolist() == [victim]


# 4. Formula injection in explain --csv ------------------------------------------------------------------

@pytest.fixture
def checkpoint(dermcam_home: Path) -> dict:
    """A store checkpoint of a tiny random test_efficientnet."""
    import timm
    import torch

    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    classes = ["nv", "bkl", "mel"]
    model = timm.create_model("test_efficientnet", num_classes=len(classes))
    run = create_run({"backbone": "test_efficientnet"}, run_id="c0ffee")
    sidecar = {"backbone": "test_efficientnet", "classes": classes,
               "preprocessing": {"input_size": [3, 64, 64], "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"},
               "metrics": {"balanced_accuracy": 0.5},
               "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.5}}
    return save_checkpoint(run, epoch=0, model_state=model.state_dict(), sidecar=sidecar).sidecar


def test_explain_csv_cells_are_not_formulas(runner, checkpoint: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths: the cells start with the file names
    photo = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(photo).save("=HYPERLINK(1+1).jpg")
    Image.fromarray(photo).save("+1.png")
    Path("@SUM(1).jpg").write_text("not a picture")
    result = runner.invoke(app, ["explain", "=HYPERLINK(1+1).jpg", "+1.png", "@SUM(1).jpg", "-o", "out",
                                 "--csv", "r.csv"])
    assert result.exit_code == 5, result.output
    with Path("r.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == ["'=HYPERLINK(1+1).jpg", "'+1.png", "'@SUM(1).jpg"]
    assert rows[2]["error"].startswith("'@SUM(1).jpg: ")
    for row in rows[:2]:
        assert row["status"] == "ok" and row["overlay"].startswith("out")
        assert abs(sum(float(row[f"p_{c}"]) for c in ("nv", "bkl", "mel")) - 1) < 1e-4  # numbers stay numbers


def test_write_csv_quotes_every_formula_prefix_but_not_numbers(tmp_path: Path) -> None:
    from dermcam.explain import pipeline
    from dermcam.explain.pipeline import ExplainedImage, ExplainFailure, ExplainReport

    report = ExplainReport(checkpoint={}, classes=["-a", "b"], method="gradcam", layer="x", tta=False,
                           out_dir=tmp_path)
    names = ["-1.jpg", "\tx.jpg", "\rx.jpg", "=x.jpg", "plain.jpg"]
    report.inputs = [Path(n) for n in names]
    report.results = [ExplainedImage(Path(n), "-a", {"-a": 0.25, "b": 0.75}, "-a", Path("-o.png"), Path("s.json"),
                                     faithfulness={"deletion_auc": 0.5, "insertion_auc": 0.75}) for n in names[:4]]
    report.failures = [ExplainFailure(Path(names[4]), "=cmd|' /C calc'!A0")]
    with pipeline.write_csv(report, tmp_path / "r.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][3:5] == ["p_-a", "p_b"]
    assert [r[0] for r in rows[1:]] == ["'-1.jpg", "'\tx.jpg", "'\rx.jpg", "'=x.jpg", "plain.jpg"]
    column = {name: i for i, name in enumerate(rows[0])}
    assert rows[1][column["predicted"]] == "'-a" and rows[1][column["target"]] == "'-a"
    assert rows[1][column["overlay"]] == "'-o.png"
    assert rows[1][3:5] == ["0.250000", "0.750000"]
    assert [rows[1][column["deletion_auc"]], rows[1][column["insertion_auc"]]] == ["0.5", "0.75"]
    assert rows[5][-1] == "'=cmd|' /C calc'!A0"


# 5. Options ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny\n", "tiny\r", "ti\tny", "tiny\x00", "", "a" * 65])
def test_names_with_control_characters_are_refused(runner, ham_src: Path, dermcam_home: Path, name: str) -> None:
    # the option checks name the option (--name) for control characters; the library names the rule
    assert_one_line_error(run_prepare(runner, ham_src, "--name", name), "name")
    assert not (dermcam_home / "datasets").exists() or not any((dermcam_home / "datasets").iterdir())


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "--seed"), ({"seed": 1.5}, "--seed"), ({"seed": "1"}, "--seed"), ({"seed": True}, "--seed"),
    ({"max_per_class": 0}, "--max-per-class"), ({"max_per_class": "5"}, "--max-per-class"),
    ({"max_per_class": 2.0}, "--max-per-class"), ({"workers": "2"}, "--workers"),
    ({"fractions": ["a", 0, 0]}, "fractions"), ({"name": 5}, "data set name"),
])
def test_library_refuses_bad_option_values(ham_src: Path, options: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        prepare(ham_src, cache_size=(32, 24), **options)


def test_numpy_integers_are_fine(ham_src: Path) -> None:
    report = prepare(ham_src, seed=np.int64(3), max_per_class=np.int32(100), cache_size=(32, 24))
    assert report.manifest["seed"] == 3 and report.manifest["max_per_class"] == 100


# 6. Cache from an older decoder -------------------------------------------------------------------------

@pytest.mark.parametrize("old_format", [0, None])  # None: a manifest from before the format was recorded
def test_cache_of_an_older_format_is_decoded_again(runner, ham_src: Path, old_format: int | None) -> None:
    first = json.loads(run_prepare(runner, ham_src).stdout)
    manifest_path = Path(first["path"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["cache"]["format"] >= 1
    if old_format is None:
        del manifest["cache"]["format"]
    else:
        manifest["cache"]["format"] = old_format
    manifest_path.write_text(json.dumps(manifest))
    image_path(ham_src, read_csv(ham_src)["image_id"][0]).unlink()  # a changed image set
    second = json.loads(run_prepare(runner, ham_src).stdout)
    assert (second["reused"], second["decoded"]) == (0, first["images"] - 1)
    assert second["manifest"]["cache"]["format"] == first["manifest"]["cache"]["format"]
    third = json.loads(run_prepare(runner, ham_src, "--seed", "4").stdout)  # same format now: rows are copied
    assert (third["reused"], third["decoded"]) == (first["images"] - 1, 0)


# Fuzz: mutated metadata CSVs ----------------------------------------------------------------------------

NASTY = ["NaN", "", "null", "N/A", "1e309", "-1", str(10**40), "9" * 400, "\u202eevil", "😀", "e\u0301",
         "\u2028", '"', '""', "'", ",", "\\", "\x00", "\x1b[31m", "=1+1", "ISIC_0000000", "mel", "nv", "x" * 100_000]


TEXT_MUTATIONS = ("drop_column", "duplicate_column", "rename_column", "empty_cells", "nasty_cells",
                  "duplicate_rows", "short_rows", "long_rows")
BYTE_MUTATIONS = ("crlf", "bom", "quote", "delimiter", "truncate", "garbage", "random_bytes")


def _mutate_rows(rows: list[list[str]], kind: str, rng: random.Random) -> list[list[str]]:
    """A cell- or column-level mutation of the parsed rows (rows may have any number of cells)."""
    col = rng.randrange(max(len(r) for r in rows))

    def cell(row: list[str]) -> str:
        return row[col] if col < len(row) else ""

    if kind == "drop_column":
        return [r[:col] + r[col + 1:] for r in rows]
    if kind == "duplicate_column":  # the same name again, or one that differs only in case
        upper = rng.random() < 0.5
        return [r + [cell(r).upper() if i == 0 and upper else cell(r)] for i, r in enumerate(rows)]
    if kind == "rename_column" and col < len(rows[0]):
        rows[0][col] = rng.choice(["", " ", "DX", "Image_ID", " lesion_id", "ünïcode", "dx.1", "line", "age"])
    elif kind in ("empty_cells", "nasty_cells"):
        for _ in range(rng.randint(1, 20)):
            row = rng.choice(rows)
            if row:
                row[rng.randrange(len(row))] = "" if kind == "empty_cells" else rng.choice(NASTY)
    elif kind == "duplicate_rows":
        rows += [list(rng.choice(rows)) for _ in range(rng.randint(1, 5))]
    elif kind == "short_rows":
        row = rng.choice(rows)
        del row[rng.randrange(len(row) + 1):]
    elif kind == "long_rows":
        rng.choice(rows).extend(rng.choice(NASTY) for _ in range(rng.randint(1, 3)))
    return rows


def _mutate_bytes(raw: bytes, kind: str, rng: random.Random) -> bytes:
    """A byte-level mutation: line endings, BOM, quotes, delimiters, truncation, garbage."""
    at = rng.randrange(len(raw) + 1)
    if kind == "crlf":
        return raw.replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\n"]))
    if kind == "bom":
        return b"\xef\xbb\xbf" * rng.randint(1, 2) + raw
    if kind == "quote":
        return raw[:at] + rng.choice([b'"', b'"""', b"'"]) + raw[at:]
    if kind == "delimiter":
        return raw.replace(b",", rng.choice([b";", b"\t", b", ", b",,"]))
    if kind == "truncate":
        return raw[:at]
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
    return raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + raw[at:]


def _mutate(text: str, rng: random.Random) -> bytes:
    """One to three random mutations of a valid metadata CSV."""
    raw = text.encode()
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(TEXT_MUTATIONS + BYTE_MUTATIONS)
        if kind in BYTE_MUTATIONS:
            raw = _mutate_bytes(raw, kind, rng)
            continue
        rows = [line.split(",") for line in raw.decode("utf-8", errors="replace").split("\n")]
        raw = "\n".join(",".join(r) for r in _mutate_rows(rows, kind, rng)).encode()
    return raw


def test_fuzzed_metadata_never_crashes_or_touches_other_sets(runner, ham_src: Path, dermcam_home: Path) -> None:
    assert run_prepare(runner, ham_src, "--name", "keep").exit_code == 0
    keep = dermcam_home / "datasets" / "keep"
    before = store_hashes(keep)
    valid = (ham_src / CSV).read_text()
    rng = random.Random(12)
    deadline = time.monotonic() + 20  # a guard on slow machines; 80 cases take about two seconds
    codes = set()
    for case in range(80):
        if time.monotonic() > deadline:
            break
        data = _mutate(valid, rng)
        (ham_src / CSV).write_bytes(data)
        result = runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE, "--name", "fuzz"])
        context = f"case {case}: {data[:300]!r}\n{result.output[-2000:]}"
        assert result.exception is None or isinstance(result.exception, SystemExit), context
        assert result.exit_code in EXIT_CODES and "Traceback" not in result.output, context
        if result.exit_code == 2:  # stderr may also hold the progress bars of the scan
            assert len([line for line in result.stderr.splitlines() if line.startswith("Error: ")]) == 1, context
        assert store_hashes(keep) == before, context
        leftovers = [p.name for p in (dermcam_home / "datasets").iterdir() if p.name not in ("keep", "fuzz")]
        assert not leftovers, context
        codes.add(result.exit_code)
    assert {0, 2} <= codes or {5, 2} <= codes  # the mutations reach both accepted and refused CSVs


@pytest.mark.parametrize("size", [(103, 78), (103, 80), (317, 239)])
def test_a_photo_whose_cover_box_rounds_outside_it_still_decodes(tmp_path: Path, size: tuple[int, int]) -> None:
    """At 256x192 these sizes put the centred crop's left edge at -7e-15, which Pillow refused: valid
    JPEGs were skipped as 'unreadable' (1,260 sizes between 100x75 and 320x240)."""
    from PIL import Image

    from dermcam.data.geometry import cover_box
    from dermcam.data.images import decode_image

    left, top, right, bottom = cover_box(size, (256, 192))
    assert 0 <= left and 0 <= top and right <= size[0] and bottom <= size[1]
    path = tmp_path / "photo.jpg"
    Image.new("RGB", size, (180, 120, 100)).save(path)
    array, note = decode_image(path, (256, 192))
    assert array.shape == (192, 256, 3) and note is None
