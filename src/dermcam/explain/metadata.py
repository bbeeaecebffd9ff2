"""A metadata model with each image's metadata bound to it: what the CAM, TTA and faithfulness code calls.

Everything in :mod:`dermcam.explain` calls ``model(x)``: the CAM machinery, flip TTA, the faithfulness
curves, ScoreCAM's masked copies. A model that fuses patient metadata
(:class:`~dermcam.models.metadata.MetadataFusion`, or an ensemble with such members) must get
``model(x, meta)`` in every one of those calls, or the map would explain a different answer (the
"nothing known" one) than the one the image got. :class:`WithMetadata` is that model with the rows
bound, so none of that code changes and every forward it makes reads the metadata.

The rows are bound to images by batch position: ``R`` rows answer a batch of exactly ``R`` images (a
prediction, Grad-CAM, TTA's flips), and one row answers a batch of any size. Code that runs *other*
batches (ScoreCAM's masked copies of one image, the faithfulness curve's steps) gets a model bound to
one image's row: :func:`groups` splits a batch into runs of images with equal rows, so images without
metadata (all alike) still share a pass. A batch of another size than the rows is an error, never a
silent misalignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch  # only ever imported by functions that run a model (never by the CLI's option checks)

# The metadata of a batch: one (B, D) array for a metadata model; for an ensemble one array (or None) per
# member (members encode with their own vocabularies); None for a model that reads none.
Rows = np.ndarray | Sequence[np.ndarray | None] | None


class WithMetadata(torch.nn.Module):
    """``model`` answering ``forward(x)`` as ``model(x, rows)`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, rows: Rows) -> None:
        super().__init__()
        self.model = model
        self.rows = rows

    def get_submodule(self, target: str) -> torch.nn.Module:
        """Layer names are the model's own (``backbone.bn2``), as ``find_target_layer`` gives them."""
        return self.model.get_submodule(target) if target else self

    @staticmethod
    def _tensor(values: np.ndarray | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if values is None:
            return None
        if len(values) not in (1, batch):
            raise ValueError(f"metadata for {len(values)} images bound to a model asked about {batch}")
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)
        return tensor.expand(batch, -1) if len(values) == 1 else tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rows, np.ndarray):
            return self.model(x, self._tensor(self.rows, x.shape[0], x.device))
        return self.model(x, [self._tensor(r, x.shape[0], x.device) for r in self.rows or []])


def bind(model: torch.nn.Module, rows: Rows) -> torch.nn.Module:
    """``model`` with ``rows`` bound (the model itself when ``rows`` is None: it reads no metadata)."""
    return model if rows is None else WithMetadata(model, rows)


def take(rows: Rows, index: Sequence[int] | np.ndarray) -> Rows:
    """The rows of the images at ``index`` (each member's, for an ensemble)."""
    if rows is None:
        return None
    if isinstance(rows, np.ndarray):
        return rows[np.asarray(index)]
    return [None if r is None else r[np.asarray(index)] for r in rows]


def groups(rows: Rows, count: int) -> list[list[int]]:
    """The positions of ``count`` images in runs of equal metadata (first appearance first): one run of
    all when ``rows`` is None or every image has the same row."""
    if rows is None:
        return [list(range(count))]
    parts = [rows] if isinstance(rows, np.ndarray) else [r for r in rows if r is not None]
    found: dict[bytes, list[int]] = {}
    for i in range(count):
        key = b"|".join(np.ascontiguousarray(p[i], dtype=np.float32).tobytes() for p in parts)
        found.setdefault(key, []).append(i)
    return list(found.values())


def one_row(rows: Rows) -> Rows:
    """The first image's row only (for a run of equal rows): bound, it answers a batch of any size."""
    return take(rows, [0])



def grouped_faithfulness(model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                         rows: Rows) -> dict[str, list[float]]:
    """Deletion and insertion AUC per image (:func:`dermcam.explain.faithfulness.faithfulness`), each
    image's curve computed with its own metadata bound."""
    from dermcam.explain.faithfulness import faithfulness

    out: dict[str, list[float]] = {"deletion_auc": [0.0] * len(targets), "insertion_auc": [0.0] * len(targets)}
    for run in groups(rows, len(targets)):
        measured = faithfulness(bind(model, one_row(take(rows, run))), x[run], maps[run],
                                [int(targets[i]) for i in run])
        for key, values in out.items():
            for i, value in zip(run, measured[key]):
                values[i] = value
    return out
