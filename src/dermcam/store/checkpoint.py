"""The checkpoint store: safetensors weights with JSON sidecars, written so that nothing is ever lost.

Layout of one training run, ``<store>/runs/<run_id>/``::

    run.json                     the run's config, status and resume pointer
    metrics.jsonl                one JSON line per epoch (train loss, val metrics)
    epoch-0007.safetensors       model weights after epoch 7 (what inference loads)
    epoch-0007.state.safetensors training state tensors (optimizer, EMA, RNG) for an exact resume
    epoch-0007.json              the sidecar: written LAST, so a checkpoint without a valid sidecar is an
                                 incomplete write and is ignored (and cleaned up by ``ckpt verify --clean``)
    report/                      test-split evaluation of the best checkpoint

Checkpoint ids are ``RUN:EPOCH`` (``3fa9c1:7``); commands also accept a run id (its best checkpoint),
a sha256 prefix of the weights, ``best``, ``latest`` or a path to a ``.safetensors`` file.
No pickle anywhere: tensors live in safetensors, everything else in JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam import __version__
from dermcam.errors import CorruptError, NotFoundError
from dermcam.store.files import atomic_write_json, read_json, utc_now
from dermcam.store.tensors import load_tensors, save_tensors, split_state

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA = "dermcam.checkpoint/1"


DEFAULT_MONITOR = "val_balanced_accuracy"


_EPOCH_FILE = re.compile(r"^epoch-(\d{4,})\.json$")


def versions() -> dict[str, str]:
    import timm
    import torch

    return {"dermcam": __version__, "torch": torch.__version__, "timm": timm.__version__}


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: weights + sidecar (+ training state when it can be resumed from)."""

    sidecar_path: Path
    sidecar: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.sidecar["id"])

    @property
    def run_id(self) -> str:
        return str(self.sidecar["run_id"])

    @property
    def epoch(self) -> int:
        return int(self.sidecar["epoch"])

    @property
    def run_dir(self) -> Path:
        return self.sidecar_path.parent

    @property
    def weights_path(self) -> Path:
        return self.run_dir / self.sidecar["weights"]["file"]

    @property
    def state_path(self) -> Path | None:
        state = self.sidecar.get("state")
        return self.run_dir / state["file"] if state else None

    @property
    def monitor_value(self) -> float | None:
        value = self.sidecar.get("monitor", {}).get("value")
        return None if value is None else float(value)

    @property
    def monitor_mode(self) -> str:
        return str(self.sidecar.get("monitor", {}).get("mode", "max"))

    def files(self) -> list[Path]:
        paths = [self.weights_path, self.sidecar_path]
        if self.state_path is not None:
            paths.append(self.state_path)
        return paths

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files() if p.exists())

    def load_weights(self, verify: bool = True) -> dict[str, torch.Tensor]:
        return load_tensors(self.weights_path, self.sidecar["weights"]["sha256"] if verify else None)

    def load_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The JSON part and tensors of the training state (for resume)."""
        if self.state_path is None:
            raise NotFoundError(f"checkpoint {self.id} has no training state to resume from")
        tensors = load_tensors(self.state_path, self.sidecar["state"]["sha256"])
        return self.sidecar["state"]["json"], tensors


def epoch_stem(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(run_dir: Path, *, epoch: int, model_state: Mapping[str, torch.Tensor],
                    sidecar: dict[str, Any], train_state: Any | None = None) -> Checkpoint:
    """Write weights, then training state, then the sidecar (last: it is what makes the checkpoint valid).

    ``sidecar`` holds the descriptive fields (metrics, config, classes, ...); ids, file names, hashes,
    sizes, versions and time are added here.
    """
    run_dir = Path(run_dir)
    stem = epoch_stem(epoch)
    sidecar_path = run_dir / f"{stem}.json"
    # An older checkpoint of this epoch (after a rollback) is invalidated before its files change.
    sidecar_path.unlink(missing_ok=True)

    weights_file = f"{stem}.safetensors"
    weights_sha = save_tensors(run_dir / weights_file, model_state, metadata={"format": "pt", "dermcam": CHECKPOINT_SCHEMA})
    full = dict(sidecar)
    full.update(
        schema=CHECKPOINT_SCHEMA,
        id=f"{run_dir.name}:{epoch}",
        run_id=run_dir.name,
        epoch=epoch,
        weights={"file": weights_file, "sha256": weights_sha, "size": (run_dir / weights_file).stat().st_size},
        versions=versions(),
        created=utc_now(),
    )
    if train_state is not None:
        state_file = f"{stem}.state.safetensors"
        skeleton, tensors = split_state(train_state)
        state_sha = save_tensors(run_dir / state_file, tensors)
        full["state"] = {"file": state_file, "sha256": state_sha, "json": skeleton}
    atomic_write_json(sidecar_path, full)
    return Checkpoint(sidecar_path, full)


def read_checkpoint(sidecar_path: Path) -> Checkpoint:
    """Parse a sidecar; CorruptError when it is not a complete dermcam checkpoint sidecar."""
    try:
        data = read_json(sidecar_path)
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{sidecar_path} is not valid JSON ({exc})") from None
    required = ("schema", "id", "run_id", "epoch", "weights", "backbone", "classes", "preprocessing")
    if not isinstance(data, dict) or data.get("schema") != CHECKPOINT_SCHEMA or any(k not in data for k in required):
        raise CorruptError(f"{sidecar_path} is not a dermcam checkpoint sidecar")
    ckpt = Checkpoint(Path(sidecar_path), data)
    if not ckpt.weights_path.is_file():
        raise CorruptError(f"{sidecar_path}: its weights file {ckpt.weights_path.name} is missing")
    return ckpt


def run_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of one run, by epoch. Incomplete or damaged ones are skipped here."""
    found = []
    for path in sorted(Path(run_dir).glob("epoch-*.json")):
        if not _EPOCH_FILE.match(path.name):
            continue
        try:
            found.append(read_checkpoint(path))
        except CorruptError:
            continue
    return sorted(found, key=lambda c: c.epoch)


def better(a: Checkpoint, b: Checkpoint | None) -> bool:
    """Is ``a`` better than ``b`` by its monitored metric? Ties go to the earlier epoch (fewer epochs)."""
    if b is None:
        return a.monitor_value is not None
    if a.monitor_value is None:
        return False
    if b.monitor_value is None:
        return True
    if a.monitor_mode == "min":
        return a.monitor_value < b.monitor_value
    return a.monitor_value > b.monitor_value


def best_of(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    """The best checkpoint by its monitored metric.

    Values of different metrics are not comparable (a val_loss of 0.8 is not "better" than a balanced
    accuracy of 0.9), so when runs monitor different metrics only those monitoring the default
    (val_balanced_accuracy) compete, or else those monitoring the newest checkpoint's metric.
    """
    ckpts = [c for c in checkpoints if c.monitor_value is not None]
    names = {c.sidecar["monitor"].get("name") for c in ckpts}
    if len(names) > 1:
        newest = max(ckpts, key=lambda c: c.sidecar.get("created", ""))
        chosen = DEFAULT_MONITOR if DEFAULT_MONITOR in names else newest.sidecar["monitor"].get("name")
        ckpts = [c for c in ckpts if c.sidecar["monitor"].get("name") == chosen]
    best: Checkpoint | None = None
    for ckpt in ckpts:
        if better(ckpt, best):
            best = ckpt
    return best


def rank_key(ckpt: Checkpoint) -> float:
    """Sort key: smaller is better, whatever the metric's direction."""
    value = ckpt.monitor_value
    if value is None:
        return float("inf")
    return value if ckpt.monitor_mode == "min" else -value
