"""A hostile-input test of dermcam (issue #21, part B): nothing is read from outside the source folder,
names are taken as people write them, and a file of the wrong kind is named, not misparsed.

Through the CLI runner, on tiny generated sources: exit codes, one-line messages, problems.csv,
index.csv and the manifest are what is checked.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import pickle
import shutil
import unicodedata
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dermcam.cli import app

pytest.register_assert_rewrite("fixtures_ham")
from fixtures_ham import CSV, image_path, read_csv  # noqa: E402
from test_layouts import index_of, prepare_json, problems_of, write_image  # noqa: E402

pytest_plugins = ["fixtures_ham"]  # ham_src, synthetic_master

SMALL_CACHE = ["--cache-size", "16x12"]  # as test_layouts' prepare_json


# Helpers ----------------------------------------------------------------------------------------------

def class_folders(src: Path, names: list[str], per_class: int = 3, seed: int = 0) -> Path:
    """A folder per name (names kept exactly, spaces included), file stems unique across folders."""
    for i, name in enumerate(names):
        for j in range(per_class):
            write_image(src / name / f"{name.strip()[:3]}_{i}_{j}.jpg", seed + 10 * i + j)
    return src


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(runner, src: Path, *args: str, code: int = 0) -> dict:
    """``dermcam prepare SRC --json``, exit code ``code`` and no traceback required; the report."""
    return prepare_json(runner, str(src), *args, code=code)


def one_line_error(result, code: int = 2) -> str:
    """The single ``Error:`` line of a failed command (exit ``code``)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# Nothing is read from outside the source folder -------------------------------------------------------

def test_a_class_folder_linked_from_outside_is_one_listed_skip(runner, tmp_path: Path) -> None:
    src = class_folders(tmp_path / "derm", ["mel", "nv"])
    elsewhere = class_folders(tmp_path / "elsewhere", ["bkl"], seed=50)
    (src / "bkl").symlink_to(elsewhere / "bkl", target_is_directory=True)
    secret = tmp_path / "secret.jpg"
    write_image(secret, 99)
    (src / "mel" / "mel_link.jpg").symlink_to(secret)  # an image linked from outside
    (src / "nv" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a deeper folder link
    (src / "nv" / "twin.jpg").symlink_to(src / "nv" / "nv_1_0.jpg")  # a link that stays inside keeps working
    (src / "mel" / "loop").symlink_to(src / "mel", target_is_directory=True)  # never followed: no hang
    (src / "notes.txt").symlink_to(tmp_path / "secret.jpg")  # not an image nor a folder: none of prepare's business

    report = prepare(runner, src, code=5)
    unsafe = problems_of(report).query("kind == 'unsafe_path'").set_index("file")
    assert sorted(unsafe.index) == ["bkl", "mel/mel_link.jpg", "nv/more"]
    assert set(unsafe["action"]) == {"skipped"}
    assert str(elsewhere / "bkl") in unsafe.loc["bkl", "detail"] and "outside derm/" in unsafe.loc["bkl", "detail"]
    assert unsafe.loc["mel/mel_link.jpg", "image_id"] == "mel_link"
    index = index_of(report)
    assert report["manifest"]["classes"] == ["mel", "nv"]
    outside = {sha256(p) for p in tmp_path.glob("elsewhere/**/*.jpg")} | {sha256(secret)}
    assert not outside & set(index["sha256"])
    assert "nv/twin.jpg" in set(index["source"]) and len(index) == 7
    assert report["manifest"]["problems"]["unsafe_path"] == 3


def test_ham10000_image_folder_and_images_linked_from_outside(runner, ham_src: Path, tmp_path: Path) -> None:
    part_2 = ham_src / "HAM10000_images_part_2"
    moved = Path(shutil.move(part_2, tmp_path / "other-disk"))
    part_2.symlink_to(moved, target_is_directory=True)
    victim = image_path(ham_src, read_csv(ham_src)["image_id"][0])
    stranger = tmp_path / "stranger.jpg"
    write_image(stranger, 7)
    victim.unlink()
    victim.symlink_to(stranger)

    report = prepare(runner, ham_src, code=5)
    problems = problems_of(report)
    unsafe = problems.query("kind == 'unsafe_path'")
    assert sorted(unsafe["file"]) == sorted(["HAM10000_images_part_2", victim.relative_to(ham_src).as_posix()])
    missing = set(problems.query("kind == 'missing_image'")["image_id"])
    assert missing == {p.stem for p in moved.glob("*.jpg")} | {victim.stem}
    index = index_of(report)
    assert not index["source"].str.startswith("HAM10000_images_part_2").any()
    assert sha256(stranger) not in set(index["sha256"])


def test_a_metadata_csv_linked_from_outside_is_not_read(runner, ham_src: Path, tmp_path: Path) -> None:
    outside = Path(shutil.move(ham_src / CSV, tmp_path / "metadata.csv"))
    (ham_src / CSV).symlink_to(outside)
    line = one_line_error(runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE]))
    assert "HAM10000_metadata.csv" in line and "symlinks leading outside ham10000/" in line


def test_isic_images_and_csv_paths_leading_outside(runner, tmp_path: Path) -> None:
    src = tmp_path / "isic"
    codes = ["MEL", "NV", "BKL"]
    rows = []
    for n in range(9):
        write_image(src / "Input" / f"ISIC_{n:07d}.jpg", n)
        rows.append(",".join([f"ISIC_{n:07d}"] + ["1.0" if c == codes[n % 3] else "0.0" for c in codes]))
    (src / "GroundTruth.csv").write_text("image," + ",".join(codes) + "\n" + "\n".join(rows) + "\n")
    stranger = tmp_path / "stranger.jpg"
    write_image(stranger, 77)
    (src / "Input" / "ISIC_0000000.jpg").unlink()
    (src / "Input" / "ISIC_0000000.jpg").symlink_to(stranger)
    report = prepare(runner, src, code=5)
    assert problems_of(report).query("kind == 'unsafe_path'")["file"].tolist() == ["Input/ISIC_0000000.jpg"]
    assert sha256(stranger) not in set(index_of(report)["sha256"])

    # the csv layout: a path that stays in the folder by its text but that a symlink leads out of
    team = tmp_path / "team"
    for i in range(6):
        write_image(team / "images" / f"img_{i}.jpg", i)
    (team / "linked").symlink_to(tmp_path / "isic" / "Input", target_is_directory=True)
    (team / "inside").symlink_to(team / "images", target_is_directory=True)
    write_image(team / "images" / "extra.jpg", 6)
    lines = [f"images/img_{i}.jpg,{'mel' if i % 2 else 'nv'}" for i in range(6)]
    lines += ["linked/ISIC_0000001.jpg,mel", "inside/extra.jpg,nv", "inside/../../isic/Input/ISIC_0000002.jpg,nv"]
    (team / "labels.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    report = prepare(runner, team, code=5)
    unsafe = problems_of(report).query("kind == 'unsafe_path'").set_index("file")
    assert sorted(unsafe.index) == ["inside/../../isic/Input/ISIC_0000002.jpg", "linked/ISIC_0000001.jpg"]
    assert "CSV line 8: a symlink leads it outside team/" in unsafe.loc["linked/ISIC_0000001.jpg", "detail"]
    index = index_of(report)
    assert "inside/extra.jpg" in set(index["source"]) and len(index) == 7


def test_a_source_whose_class_folders_all_lead_outside_says_so(runner, tmp_path: Path) -> None:
    elsewhere = class_folders(tmp_path / "elsewhere", ["mel", "nv"])
    src = tmp_path / "links"
    src.mkdir()
    for name in ("mel", "nv"):
        (src / name).symlink_to(elsewhere / name, target_is_directory=True)
    line = one_line_error(runner.invoke(app, ["prepare", str(src), *SMALL_CACHE]))
    assert "cannot tell the layout" in line and "symlinks leading outside links/: mel, nv" in line
    line = one_line_error(runner.invoke(app, ["prepare", str(src), "--layout", "folders", *SMALL_CACHE]))
    assert "no class folder with images" in line and "mel, nv" in line


# Names as people write them ---------------------------------------------------------------------------

def test_class_folders_with_spaces_are_trimmed_not_dropped(runner, tmp_path: Path) -> None:
    src = class_folders(tmp_path / "derm", [" mel", "mel", "nv ", "  Basal Cell Carcinoma "])
    report = prepare(runner, src)
    manifest = report["manifest"]
    assert manifest["classes"] == ["basal_cell_carcinoma", "mel", "nv"] and manifest["problems"] == {}
    index = index_of(report)
    assert index["dx"].value_counts().to_dict() == {"mel": 6, "basal_cell_carcinoma": 3, "nv": 3}
    assert {" mel/mel_0_0.jpg", "mel/mel_1_0.jpg", "  Basal Cell Carcinoma /Bas_3_0.jpg"} <= set(index["source"])


def test_labels_and_one_hot_headers_with_spaces_are_trimmed(runner, tmp_path: Path) -> None:
    team = tmp_path / "team"
    labels = [" mel", "MEL ", "  nv", "nv", "Basal Cell Carcinoma ", "  basal cell carcinoma"]
    for i in range(len(labels)):
        write_image(team / f"{i}.jpg", i)
    (team / "labels.csv").write_text("path,label\n" + "\n".join(f'{i}.jpg,"{d}"' for i, d in enumerate(labels)))
    assert index_of(prepare(runner, team))["dx"].tolist() == ["mel", "mel", "nv", "nv", "basal_cell_carcinoma",
                                                              "basal_cell_carcinoma"]
    isic = tmp_path / "isic"
    for n in range(6):
        write_image(isic / "Input" / f"ISIC_{n}.jpg", n)
    rows = "\n".join(f"ISIC_{n},{'1.0,0.0' if n % 2 else '0.0,1.0'}" for n in range(6))
    (isic / "truth.csv").write_text(f"image , MEL,NV \n{rows}\n")
    assert prepare(runner, isic)["manifest"]["classes"] == ["mel", "nv"]


def test_unicode_class_names_from_folders_and_csv_through_prepare_show_and_train(runner, tmp_path: Path) -> None:
    decomposed = unicodedata.normalize("NFD", "Mélanome")  # as macOS stores folder names
    src = class_folders(tmp_path / "derm", [decomposed, "nævus"], per_class=6)
    report = prepare(runner, src, "--name", "unicode")
    assert report["manifest"]["classes"] == ["mélanome", "nævus"]  # composed (NFC), lower-cased
    assert report["manifest"]["label_encoding"] == {"mélanome": 0, "nævus": 1}
    show = runner.invoke(app, ["data", "show", "unicode"])
    assert show.exit_code == 0 and "mélanome" in show.stdout and "nævus" in show.stdout
    assert json.loads(runner.invoke(app, ["data", "show", "unicode", "--json"]).stdout)["classes"] == ["mélanome",
                                                                                                       "nævus"]
    team = tmp_path / "team"
    for i in range(4):
        write_image(team / f"{i}.jpg", i)
    (team / "labels.csv").write_text("path,label\n0.jpg,Mélanome\n1.jpg,mélanome\n2.jpg,Nævus\n3.jpg,nævus\n",
                                     encoding="utf-8")
    assert index_of(prepare(runner, team))["dx"].tolist() == ["mélanome", "mélanome", "nævus", "nævus"]

    train = runner.invoke(app, ["train", "--data", "unicode", "--backbone", "test_efficientnet", "--pretrained",
                                "none", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--json"])
    assert train.exit_code == 0, train.output
    run_dir = Path(json.loads(train.stdout)[0]["run_dir"])
    sidecar = json.loads((run_dir / "epoch-0000.json").read_text(encoding="utf-8"))
    assert sidecar["classes"] == ["mélanome", "nævus"]


# CSV encodings ----------------------------------------------------------------------------------------

def _team(tmp_path: Path, name: str) -> tuple[Path, str]:
    """Six images and the text of their labels CSV (to be written in some encoding)."""
    team = tmp_path / name
    for i in range(6):
        write_image(team / f"img_{i}.jpg", i)
    text = "path,diagnosis,note\n" + "".join(f"img_{i}.jpg,{'Mélanome' if i % 2 else 'Nævus'},’ok’\n"
                                              for i in range(6))
    return team, text


@pytest.mark.parametrize("encoding, transform", [
    ("utf-8-sig", lambda text: text),  # Excel's "CSV UTF-8"
    ("utf-16", lambda text: text.replace(",", "\t")),  # Excel's "Unicode text": UTF-16 with a BOM, tabs
    ("utf-16-le", lambda text: text),  # UTF-16 without a BOM
    ("utf-8", lambda text: text.replace(",", ";")),  # Excel's CSV where the decimal mark is a comma
])
def test_unicode_csvs_in_any_encoding_excel_writes_are_read(runner, tmp_path: Path, encoding: str, transform) -> None:
    team, text = _team(tmp_path, "team")
    (team / "labels.csv").write_bytes(transform(text).encode(encoding))
    report = prepare(runner, team)
    assert report["manifest"]["problems"] == {}
    assert index_of(report)["dx"].tolist() == ["nævus", "mélanome"] * 3


def test_a_windows_1252_csv_is_read_with_a_note(runner, tmp_path: Path) -> None:
    team, text = _team(tmp_path, "team")
    (team / "labels.csv").write_bytes(text.encode("cp1252"))  # Excel's plain "CSV" on Windows
    report = prepare(runner, team)  # a fix, not a skip: exit 0
    assert index_of(report)["dx"].tolist() == ["nævus", "mélanome"] * 3
    [note] = problems_of(report).query("kind == 'encoding'").itertuples()
    assert note.file == "labels.csv" and note.action == "fixed" and "read as Windows-1252" in note.detail


def test_a_utf16_ham10000_metadata_is_detected_and_read(runner, ham_src: Path) -> None:
    rows = len(read_csv(ham_src))
    (ham_src / CSV).write_bytes(codecs.BOM_UTF16_LE + (ham_src / CSV).read_text().encode("utf-16-le"))
    report = prepare(runner, ham_src)
    assert report["manifest"]["layout"] == "ham10000" and report["images"] == rows


def test_csvs_that_cannot_be_read_are_refused_naming_what_they_are(runner, ham_src: Path) -> None:
    (ham_src / CSV).write_bytes(codecs.BOM_UTF16_LE + "image_id,dx\n".encode("utf-16-le") + b"\x00\xd8")
    line = one_line_error(runner.invoke(app, ["prepare", str(ham_src), *SMALL_CACHE]))
    assert "HAM10000_metadata.csv starts as UTF-16 text but is not valid UTF-16" in line
    with zipfile.ZipFile(ham_src / CSV, "w") as book:  # a workbook saved under the CSV's name
        book.writestr("[Content_Types].xml", "<Types/>")
        book.writestr("xl/workbook.xml", "<workbook/>")
    line = one_line_error(runner.invoke(app, ["prepare", str(ham_src), "--layout", "ham10000", *SMALL_CACHE]))
    assert "HAM10000_metadata.csv is not a CSV file: it is an Office file (.xlsx" in line


# Files of another kind where an export or weights are expected ----------------------------------------

class _Boobytrap:
    """Unpickling this creates a folder: proof that nothing was unpickled when it is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _wrong_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must call it)."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "photo.safetensors"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    files = {"photo": (png, "a PNG image")}
    contents = {
        "model.onnx": (b"\x08\x08\x12\x07pytorch\x1a\x032.5:\x9a\x01\n" + b"\x00" * 64, "an ONNX model"),
        "model.pkl": (pickle.dumps(_Boobytrap(folder / "unpickled"), protocol=4), "a Python pickle"),
        "model.txt": (b"weights are on the shared drive\n", "a text file"),
        "model.html": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        "model.lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "a Git LFS pointer"),
    }
    for name, (content, words) in contents.items():
        (folder / name).write_bytes(content)
        files[name] = (folder / name, words)
    with zipfile.ZipFile(folder / "torch.safetensors", "w") as archive:  # torch.save's zip layout
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": 1}))
    files["torch"] = (folder / "torch.safetensors", "a PyTorch checkpoint (torch.save)")
    return files


def test_a_file_of_another_kind_given_as_an_export_is_named(runner, home: Path, tmp_path: Path) -> None:
    image = tmp_path / "lesion.jpg"
    write_image(image, 3)
    for name, (path, words) in _wrong_files(tmp_path / "files").items():
        for args in (["ckpt", "restore", str(path)], ["evaluate", str(path), "--data", "synth"],
                     ["explain", str(image), "-c", str(path), "--out", str(tmp_path / "out")]):
            line = one_line_error(runner.invoke(app, args))
            assert f"this is {words}" in line, (name, args, line)
            assert "dermcam reads .safetensors exports" in line and "header claims" not in line, (name, line)
    assert not (tmp_path / "files" / "unpickled").exists()


def test_pretrained_weights_of_another_kind_are_named_and_never_unpickled(runner, home: Path, tmp_path: Path) -> None:
    files = _wrong_files(tmp_path / "files")
    for name in ("model.onnx", "model.pkl", "model.html", "photo"):
        path, words = files[name]
        result = runner.invoke(app, ["train", "--data", "synth", "--backbone", "test_efficientnet", "--pretrained",
                                     str(path), "--epochs", "1", "--image-size", "32"])
        line = one_line_error(result)
        assert f"this is {words}" in line and "not a weights file" in line, (name, line)
    assert not (tmp_path / "files" / "unpickled").exists()
