"""TensorBoard: a run's curves as event files (``dermcam train --log tensorboard[:DIR]``).

Where: ``<run folder>/tensorboard`` by default (``tensorboard --logdir <store>/runs`` shows every run),
or ``DIR/<run id>`` (``tensorboard --logdir DIR``). What: per epoch (step = epoch) ``train/loss``,
``train/lr``, ``val/<metric>`` for every validation metric, ``time/epoch_seconds`` and
``time/images_per_second``; at the start the configuration as text; at the end ``test/<metric>`` and
the report's plots (confusion matrix, curves, ROC, PR, reliability) as images.

Resume writes on in the same folder without repeating a step: the steps already there are read back
with TensorBoard's own reader, only later epochs are written, and after a rollback (``ckpt restore``)
the stale later steps are purged (``purge_step``, which TensorBoard's readers honour).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermcam.track.base import RunEnd, RunInfo, Tracker, epoch_scalars, numbers
from dermcam.track.spec import LogSpec

DEFAULT_FOLDER = "tensorboard"  # inside the run folder, stored relative to it (the store may move)
STEP_TAG = "train/loss"  # the scalar every epoch has: its steps are the epochs logged


def tag(name: str) -> str:
    """A tracked scalar's TensorBoard tag: grouped by what it measures (``val_macro_f1`` -> ``val/macro_f1``)."""
    if name == "train_loss":
        return "train/loss"
    if name == "lr":
        return "train/lr"
    if name in ("epoch_seconds", "images_per_second"):
        return f"time/{name}"
    for prefix in ("val_", "test_"):
        if name.startswith(prefix):
            return f"{prefix[:-1]}/{name[len(prefix):]}"
    return name


def logged_steps(folder: Path, scalar: str = STEP_TAG) -> set[int]:
    """The steps of ``scalar`` in the event files of ``folder``, read with TensorBoard's reader (which
    applies its purges, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    if not folder.is_dir():
        return set()
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    if scalar not in acc.Tags().get("scalars", []):
        return set()
    return {int(e.step) for e in acc.Scalars(scalar)}


def png_pixels(path: Path) -> Any:
    """A PNG as an HxWx3 uint8 array (what ``add_image`` takes with ``dataformats="HWC"``)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def config_text(config: Mapping[str, Any]) -> str:
    """The configuration as a Markdown table (TensorBoard's text tab renders Markdown)."""
    rows = "\n".join(f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in config.items())
    return "| option | value |\n| --- | --- |\n" + rows


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, spec: LogSpec, folder: Path | None = None, stored: str | None = None) -> None:
        super().__init__(spec)
        self.folder = folder  # where the event files go (known once the run is)
        self.stored = stored  # how run.json and sidecars name it
        self.writer: Any = None

    @classmethod
    def reopen(cls, identity: Mapping[str, Any], run_dir: Path) -> TensorBoardTracker:
        """The tracker of a stored identity, to add a later command's result."""
        stored = str(identity.get("dir") or DEFAULT_FOLDER)
        folder = Path(stored) if Path(stored).is_absolute() else Path(run_dir) / Path(stored).name
        return cls(LogSpec("tensorboard", str(folder)), folder, stored)

    @property
    def where(self) -> str:
        return str(self.folder) if self.folder is not None else (self.spec.target or f"<run>/{DEFAULT_FOLDER}")

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "dir": self.stored}

    def matches(self, stored: Mapping[str, Any]) -> bool:
        return stored.get("kind") == self.kind and stored.get("dir") == self.stored

    def describe(self) -> str:
        return f"TensorBoard: {self.folder} (tensorboard --logdir {self.folder.parent if self.folder else '.'})"

    def _writer(self, purge_step: int | None = None) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=30)
        return self.writer

    def start(self, run: RunInfo) -> None:
        if self.spec.target is None:
            self.folder, self.stored = Path(run.run_dir) / DEFAULT_FOLDER, DEFAULT_FOLDER
        else:
            self.folder = Path(self.spec.target) / run.run_id
            self.stored = str(self.folder)
        steps = logged_steps(self.folder)
        last = run.history[-1]["epoch"] if run.history else -1
        top = max(steps, default=-1)
        # steps beyond the run's last epoch are stale (a rollback): purged, then written anew
        writer = self._writer(purge_step=last + 1 if top > last else None)
        if not steps:
            writer.add_text("config", config_text(run.config), 0)
            writer.add_text("dermcam", f"run `{run.run_id}` ({run.run_dir}), data set `{run.dataset.get('name')}` "
                                       f"({run.dataset.get('fingerprint')}), backbone `{run.backbone}`", 0)
        for record in run.history:
            if int(record["epoch"]) > top:
                self.log_epoch(int(record["epoch"]), epoch_scalars(record, run.images_per_epoch), {})
        writer.flush()

    def log_epoch(self, epoch: int, scalars: Mapping[str, float], tags: Mapping[str, str]) -> None:
        writer = self._writer()
        for name, value in scalars.items():
            writer.add_scalar(tag(name), value, epoch)
        writer.flush()  # an epoch is minutes of work: on disk now, not in 30 s

    def finish(self, end: RunEnd, tags: Mapping[str, str]) -> None:
        writer = self._writer()
        step = end.best_epoch if end.best_epoch is not None else 0
        for name, value in numbers(end.test_metrics or {}, depth=1).items():
            writer.add_scalar(f"test/{name}", value, step)
        last = end.last_epoch if end.last_epoch is not None else step
        for path in end.files:
            if path.suffix == ".png" and path.is_file():
                writer.add_image(f"report/{path.stem}", png_pixels(path), last, dataformats="HWC")
        if tags:
            writer.add_text("result", "\n".join(f"- {k}: `{v}`" for k, v in tags.items()), last)
        self.close()

    def stop(self, status: str) -> None:
        self.close()

    def log_result(self, name: str, step: int, scalars: Mapping[str, float], files: list[Path],
                   tags: Mapping[str, str]) -> None:
        writer = self._writer()
        for key, value in scalars.items():
            writer.add_scalar(f"{name}/{key}", value, step)
        for path in files:
            if path.suffix == ".png" and path.is_file():
                writer.add_image(f"{name}/{path.stem}", png_pixels(path), step, dataformats="HWC")
        if tags:
            writer.add_text(name, "\n".join(f"- {k}: `{v}`" for k, v in tags.items()), step)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
