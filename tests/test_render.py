"""dermcam.render: overlay size, blending, legend, colour map and atomic PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcam.errors import BadInputError
from dermcam.explain.render import COLORMAPS, colorize, render_overlay, save_png
from dermcam.store.files import leftover_temporaries

GREY = 120


def _photo(width: int = 200, height: int = 150, mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", (width, height), (GREY, GREY, GREY)).convert(mode)


def _hot_top_left(size: int = 7) -> np.ndarray:
    cam = np.zeros((size, size), np.float32)
    cam[: size // 2, : size // 2] = 1.0
    return cam


def test_jet_matches_the_usual_endpoints_and_midpoints() -> None:
    jet = COLORMAPS["jet"]
    assert jet.shape == (256, 3) and jet.dtype == np.uint8
    assert tuple(jet[0]) == (0, 0, 128)  # dark blue
    assert tuple(jet[128]) == (130, 255, 126)  # green
    assert tuple(jet[255]) == (128, 0, 0)  # dark red
    np.testing.assert_array_equal(colorize(np.array([[0.0, np.nan, 1.0]])), jet[[0, 0, 255]][None])


@pytest.mark.parametrize(("size", "mode"), [((200, 150), "RGB"), ((601, 449), "L"), ((64, 300), "RGBA"),
                                             ((120, 90), "P")])
def test_overlay_has_the_photo_own_size_and_is_rgb(size: tuple[int, int], mode: str) -> None:
    out = render_overlay(_photo(*size, mode=mode), _hot_top_left(), label="mel", probability=0.9)
    assert out.size == size and out.mode == "RGB"


def test_overlay_blends_colour_where_the_map_is_hot_and_cold() -> None:
    out = np.asarray(render_overlay(_photo(), _hot_top_left(), label="nv", probability=0.5, alpha=0.45))
    expected_hot = np.round(0.55 * GREY + 0.45 * COLORMAPS["jet"][255])
    expected_cold = np.round(0.55 * GREY + 0.45 * COLORMAPS["jet"][0])
    np.testing.assert_allclose(out[15, 20], expected_hot, atol=1)  # inside the hot top-left block
    np.testing.assert_allclose(out[100, 170], expected_cold, atol=1)  # far from it, above the legend
    assert out[15, 20, 0] > out[100, 170, 0] + 50 and out[15, 20, 2] < out[100, 170, 2] - 50


def test_alpha_zero_leaves_the_photo_untouched_above_the_legend() -> None:
    photo = Image.effect_noise((160, 120), 40).convert("RGB")
    out = render_overlay(photo, _hot_top_left(), label="bkl", probability=0.3, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out)[:100], np.asarray(photo)[:100])


def test_label_probability_and_colour_bar_are_drawn_in_the_legend_strip() -> None:
    photo = _photo(400, 300)
    mel = np.asarray(render_overlay(photo, _hot_top_left(), label="mel", probability=0.873, alpha=0.0))
    bkl = np.asarray(render_overlay(photo, _hot_top_left(), label="bkl", probability=0.873, alpha=0.0))
    strip = slice(300 - 30, 300)
    assert not np.array_equal(mel[strip, :150], bkl[strip, :150])  # the text differs...
    np.testing.assert_array_equal(mel[:250], bkl[:250])  # ...and only in the legend
    assert (mel[strip, :150] > 240).all(axis=2).sum() > 50  # white text pixels
    assert mel[strip].mean() < GREY  # the strip is shaded for contrast
    # the colour bar runs from blue (low) on its left to red (high) on its right
    row = mel[285]
    coloured = np.flatnonzero((np.abs(row.astype(int) - row.mean(axis=1, keepdims=True)) > 40).any(axis=1))
    left, right = row[coloured[1]], row[coloured[-2]]
    assert left[2] > left[0] and right[0] > right[2]


def test_a_low_resolution_map_is_upsampled_smoothly() -> None:
    cam = np.array([[0.0, 1.0]], np.float32)
    out = np.asarray(render_overlay(_photo(200, 100), cam, label="nv", probability=0.5, alpha=1.0))
    reds = out[40, 10:190, 0].astype(int)
    assert reds[0] < reds[-1] and len(np.unique(reds)) > 20  # a ramp, not two blocks


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(BadInputError, match="2-D"):
        render_overlay(_photo(), np.zeros((1, 7, 7)), label="nv", probability=0.5)
    with pytest.raises(BadInputError, match="alpha"):
        render_overlay(_photo(), _hot_top_left(), label="nv", probability=0.5, alpha=1.5)
    with pytest.raises(BadInputError, match="unknown colour map 'plasma'"):
        render_overlay(_photo(), _hot_top_left(), label="nv", probability=0.5, colormap="plasma")


def test_save_png_writes_atomically_and_round_trips(tmp_path: Path) -> None:
    out = render_overlay(_photo(), _hot_top_left(), label="mel", probability=0.9)
    path = save_png(out, tmp_path / "deep" / "overlay.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as reread:
        np.testing.assert_array_equal(np.asarray(reread), np.asarray(out))
    assert leftover_temporaries(tmp_path) == []
