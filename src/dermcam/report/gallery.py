"""The report's gallery: the model's most confident errors and a few correct cases, each photo beside
its Grad-CAM overlay.

A table of recalls says how often the model is wrong; the gallery shows *how*: an error made with 95%
confidence on a lesion whose overlay lights up a ruler or a hair is a different problem from a 40%
guess between two look-alike classes. The most confident errors come first because they are the
ones a user would trust. A few correct cases (the most confident of different true classes) show
what the model looks at when it is right.

Images come from the prepared cache, i.e. exactly the pixels the model was scored on (a source
folder may have moved since); the probabilities are the ones in ``predictions.csv`` (calibrated,
the operating point's decision when there is one), so the gallery says what the report's numbers
say. The maps explain the class the model answered, as ``dermcam explain`` does. It is small on
purpose (9 images: one forward and backward pass of a batch on the CPU).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dermcam.errors import DermcamError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from PIL import Image

ERRORS = 6
CORRECT = 3
METHOD = "gradcam"
MIN_WIDTH = 256  # small caches (64x48 in the tests) are enlarged so the overlay's legend stays legible


@dataclass
class Case:
    """One image of the gallery: who it is, what the model answered and how sure it was, two PNGs."""

    image_id: str
    lesion_id: str
    true: str
    answer: str
    confidence: float
    photo: bytes
    overlay: bytes

    @property
    def correct(self) -> bool:
        return self.answer == self.true


@dataclass
class Gallery:
    errors: list[Case] = field(default_factory=list)
    correct: list[Case] = field(default_factory=list)
    note: str | None = None  # why the gallery is empty or smaller than asked


def answers(predictions: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The class each row was answered (the operating point's ``decision``, else ``predicted``) and
    the probability the model gave that class."""
    answered = predictions["decision" if "decision" in predictions.columns else "predicted"].to_numpy(dtype=str)
    probs = predictions[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    column = np.array([classes.index(a) for a in answered], dtype=np.int64)
    return answered, probs[np.arange(len(answered)), column]


def choose_cases(predictions: pd.DataFrame, classes: list[str], errors: int = ERRORS,
                 correct: int = CORRECT) -> tuple[list[int], list[int]]:
    """Row numbers of the ``errors`` most confident errors and of ``correct`` correct cases: the most
    confident of each true class in turn, so one easy class does not fill the row. One image per lesion
    (its most confident), since two photos of one lesion show the same thing twice. Ties are broken by
    image id, so the same predictions always give the same gallery."""
    answered, confidence = answers(predictions, classes)
    wrong = answered != predictions["true"].to_numpy(dtype=str)
    order = np.lexsort((predictions["image_id"].to_numpy(dtype=str), -confidence))
    lesions = [lesion or image for lesion, image in zip(predictions["lesion_id"].astype(str),
                                                        predictions["image_id"].astype(str))]
    chosen_errors = _one_per_lesion([int(i) for i in order if wrong[i]], lesions)[:errors]
    right = _one_per_lesion([int(i) for i in order if not wrong[i]], lesions)
    by_class: dict[str, list[int]] = {}
    for i in right:
        by_class.setdefault(str(predictions["true"].iat[i]), []).append(i)
    chosen_correct: list[int] = []
    while len(chosen_correct) < min(correct, len(right)):
        for rows in by_class.values():
            if rows and len(chosen_correct) < correct:
                chosen_correct.append(rows.pop(0))
    return chosen_errors, chosen_correct


def _one_per_lesion(rows: list[int], lesions: list[str]) -> list[int]:
    """The first row of each lesion in ``rows`` (an image without a lesion id is its own lesion)."""
    seen: set[str] = set()
    kept = []
    for i in rows:
        if lesions[i] not in seen:
            seen.add(lesions[i])
            kept.append(i)
    return kept


def build_gallery(predictions: pd.DataFrame, data: Any, split: str, model: torch.nn.Module,
                  sidecar: dict[str, Any], errors: int = ERRORS, correct: int = CORRECT) -> Gallery:
    """The chosen cases of ``predictions`` (a ``predictions.csv`` of ``split`` of the prepared set
    ``data``) with their photos and overlays; a CAM that cannot be computed for this model (no spatial
    layer) leaves the gallery empty with a note rather than failing the report."""
    from dermcam.data.geometry import batch_input
    from dermcam.data.metadata import model_metadata
    from dermcam.explain.ensemble import maps_for

    classes = list(sidecar["classes"])
    error_rows, correct_rows = choose_cases(predictions, classes, errors, correct)
    chosen = error_rows + correct_rows
    if not chosen:
        return Gallery(note="no predictions to show")
    rows_of = _cache_rows(data, split)
    missing = [str(predictions["image_id"].iat[i]) for i in chosen if str(predictions["image_id"].iat[i]) not in rows_of]
    if missing:
        return Gallery(note=f"{len(missing)} of the chosen images are not in data set '{data.name}' any more "
                            "(prepared again since?); evaluate again to show them")
    answered, confidence = answers(predictions, classes)
    pixels = np.array(data.images[[rows_of[str(predictions["image_id"].iat[i])] for i in chosen]], dtype=np.uint8)
    targets = [classes.index(answered[i]) for i in chosen]
    # a metadata model answered these images with their own age, sex and site: so is each map computed
    rows = model_metadata(sidecar, data.index.iloc[[rows_of[str(predictions["image_id"].iat[i])] for i in chosen]])
    try:
        maps = maps_for(model, batch_input(pixels, sidecar["preprocessing"]), METHOD, targets, rows)
    except DermcamError as exc:
        return Gallery(note=f"no Grad-CAM for this model: {exc}")
    cases = [_case(predictions, i, answered[i], float(confidence[i]), image, cam)
             for i, image, cam in zip(chosen, pixels, maps)]
    note = None if len(error_rows) == errors else f"{len(error_rows)} errors in this split"
    return Gallery(cases[:len(error_rows)], cases[len(error_rows):], note)


def _cache_rows(data: Any, split: str) -> dict[str, int]:
    """image id -> row of the image cache, for the images of ``split``."""
    rows, _ = data.split(split)
    return {str(image_id): int(row) for image_id, row in zip(data.index["image_id"].to_numpy()[rows], rows)}


def _case(predictions: pd.DataFrame, i: int, answer: str, confidence: float, pixels: np.ndarray,
          cam_map: np.ndarray) -> Case:
    from PIL import Image

    from dermcam.explain.render import render_overlay

    true = str(predictions["true"].iat[i])
    photo = Image.fromarray(pixels)
    scale = math.ceil(MIN_WIDTH / photo.width)
    if scale > 1:
        photo = photo.resize((photo.width * scale, photo.height * scale), Image.Resampling.BICUBIC)
    overlay = render_overlay(photo, cam_map, label=answer, probability=confidence,
                             note=None if answer == true else f"true: {true}")
    return Case(str(predictions["image_id"].iat[i]), str(predictions["lesion_id"].iat[i]), true, answer,
                confidence, _png(photo), _png(overlay))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
