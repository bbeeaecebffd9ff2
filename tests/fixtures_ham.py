"""Tiny HAM10000-like source folders for the data tests: a clean synthetic one, and damaged copies.

Built on :func:`dermcam.synthetic.write_synthetic_ham10000` (real JPEGs, Kaggle layout). The clean
set is written once per session and copied per test, so every test may damage its own copy.
Use them from a test module with ``pytest_plugins = ["fixtures_ham"]``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcam.data.synthetic import write_synthetic_ham10000

# 6 lesions per class, 1-3 images each, 48x36 pixels: about 36 images, written in well under a second.
SMALL = {"n_lesions_per_class": 6, "images_per_lesion": (1, 3), "size": (48, 36), "seed": 7}
CSV = "HAM10000_metadata.csv"


@pytest.fixture(scope="session")
def synthetic_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean synthetic source, shared read-only by the session: copy it before changing it."""
    return write_synthetic_ham10000(tmp_path_factory.mktemp("synthetic") / "ham", **SMALL)


@pytest.fixture
def ham_src(synthetic_master: Path, tmp_path: Path) -> Path:
    """A private copy of the clean synthetic source, free to damage."""
    return Path(shutil.copytree(synthetic_master, tmp_path / "ham10000"))


def read_csv(src: Path) -> pd.DataFrame:
    return pd.read_csv(src / CSV, dtype=str, keep_default_na=False)


def write_csv(src: Path, table: pd.DataFrame) -> None:
    (src / CSV).write_text(table.to_csv(index=False, lineterminator="\n"))


def image_path(src: Path, image_id: str) -> Path:
    return next(src.glob(f"HAM10000_images_part_*/{image_id}.*"))


def _replace_image(src: Path, image_id: str, image: Image.Image, suffix: str, **save: object) -> None:
    """Swap an image file for ``image`` saved as ``suffix`` (the old file is removed)."""
    old = image_path(src, image_id)
    old.unlink()
    image.save(old.with_suffix(suffix), **save)


# What add_bad_inputs does, by the problem kind prepare must report.
BAD_KINDS = {
    "truncated": "skipped", "unreadable": "skipped", "missing_image": "skipped", "unknown_dx": "skipped",
    "duplicate_image_id": "skipped", "unlisted_image": "skipped", "conflicting_files": "skipped",
    "listed_twice": "fixed", "missing_column": "fixed", "missing_lesion_id": "fixed",
    "duplicate_file": "fixed", "converted": "fixed",
}
CONVERTED = ("grayscale", "rgba", "cmyk", "png16", "tiff16")


def add_bad_inputs(src: Path) -> dict[str, str]:
    """Damage ``src`` with one example of every recoverable problem; returns {case: image_id}.

    Cases are the keys of BAD_KINDS plus one per entry of CONVERTED (all reported as ``converted``);
    ``missing_column`` drops the optional ``localization`` column and has no image_id.
    """
    table = read_csv(src)
    ids = iter(table["image_id"].tolist())
    case = {name: next(ids) for name in (*CONVERTED, "truncated", "unreadable", "missing_image", "unknown_dx",
                                        "duplicate_image_id", "listed_twice", "missing_lesion_id",
                                        "duplicate_file", "conflicting_files")}
    rgb = Image.open(image_path(src, case["grayscale"])).convert("RGB")

    _replace_image(src, case["grayscale"], rgb.convert("L"), ".jpg", quality=90)
    _replace_image(src, case["rgba"], Image.open(image_path(src, case["rgba"])).convert("RGBA"), ".png")
    _replace_image(src, case["cmyk"], Image.open(image_path(src, case["cmyk"])).convert("CMYK"), ".jpg")
    for name, suffix in (("png16", ".png"), ("tiff16", ".tif")):
        gray = np.asarray(Image.open(image_path(src, case[name])).convert("L"), dtype=np.uint16) * 257
        _replace_image(src, case[name], Image.fromarray(gray), suffix)

    truncated = image_path(src, case["truncated"])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    image_path(src, case["unreadable"]).write_bytes(b"this is not an image\n")
    image_path(src, case["missing_image"]).unlink()

    original = image_path(src, case["duplicate_file"])
    other = "HAM10000_images_part_2" if original.parent.name.endswith("1") else "HAM10000_images_part_1"
    shutil.copy(original, src / other / original.name)
    clash = image_path(src, case["conflicting_files"])
    other = "HAM10000_images_part_2" if clash.parent.name.endswith("1") else "HAM10000_images_part_1"
    rgb.save(src / other / clash.name, quality=90)  # a different picture under the same image_id
    rgb.save(src / "HAM10000_images_part_1" / "ISIC_9999999.jpg", quality=90)
    case["unlisted_image"] = "ISIC_9999999"

    table.loc[table["image_id"] == case["unknown_dx"], "dx"] = "melanoma?"
    table.loc[table["image_id"] == case["missing_lesion_id"], "lesion_id"] = ""
    twin = table[table["image_id"] == case["listed_twice"]]
    clash_row = table[table["image_id"] == case["duplicate_image_id"]].assign(
        dx=lambda t: t["dx"].map({"nv": "mel", "mel": "bkl", "bkl": "nv"}))
    table = pd.concat([table, twin, clash_row], ignore_index=True).drop(columns=["localization"])
    case["missing_column"] = ""
    write_csv(src, table)
    return case


def break_csv(src: Path, how: str) -> None:
    """Make the metadata unusable: ``not_csv``, ``missing_columns``, ``no_csv`` or ``empty``."""
    csv = src / CSV
    if how == "not_csv":
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        csv.write_bytes(buffer.getvalue())
    elif how == "missing_columns":
        write_csv(src, read_csv(src).drop(columns=["dx"]))
    elif how == "no_csv":
        csv.unlink()
    elif how == "empty":
        csv.write_bytes(b"")
    else:
        raise ValueError(how)
