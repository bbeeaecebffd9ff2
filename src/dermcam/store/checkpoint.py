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

A sidecar is validated against :data:`SIDECAR` whenever it is read, and must describe the checkpoint
stored where it lies (its run folder, its epoch's file names): a sidecar that fails either is
*damaged*, reported by ``ckpt list``/``verify``/``prune`` and otherwise ignored, never followed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam import __version__
from dermcam.errors import CorruptError, DermcamError, NotFoundError
from dermcam.store import schema as s
from dermcam.store.files import atomic_write_json, read_json, utc_now
from dermcam.store.locks import store_lock
from dermcam.store.paths import PLAIN_NAME, contained
from dermcam.store.tensors import check_tensors, load_tensors, save_tensors, split_state, state_outline, tensor_header

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA = "dermcam.checkpoint/1"


_EPOCH_FILE = re.compile(r"^epoch-(\d{4,})\.json$")


# The JSON part of the training state, as the trainer writes it (test and older states may omit keys).
TRAINING_STATE = s.obj(optional={
    "epoch": s.EPOCH, "step": s.integer(), "bad_epochs": s.integer(), "stopped": s.boolean,
    "best": s.nullable(s.obj({"epoch": s.EPOCH, "value": s.number(), "id": s.CHECKPOINT_ID})),
})

# A distilled student's teacher (dermcam.train.distill): the ensemble, the sha256 of its manifest when the
# run started (a resume checks it), and the loss's temperature and weight. Information for every command
# but resume, which relies on it: a damaged block makes the sidecar damaged, never a silent other teacher.
DISTILLATION = s.obj({
    "teacher": s.text(re.compile("ensemble:" + PLAIN_NAME.pattern), why="is not an ensemble (ensemble:NAME)"),
    "sha256": s.SHA256,
    "temperature": s.number(above=0.0),
    "alpha": s.satisfies(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                         "is not a number from 0 to 1"),
})

SIDECAR = s.all_of(s.obj({
    "schema": s.one_of(CHECKPOINT_SCHEMA),
    "id": s.ID,
    "run_id": s.NAME,
    "epoch": s.EPOCH,
    "weights": s.obj({"file": s.NAME, "sha256": s.SHA256}, optional={"size": s.integer()}),
    "backbone": s.BACKBONE,
    "classes": s.CLASSES,
    "preprocessing": s.PREPROCESSING,
}, optional={
    "state": s.obj({"file": s.NAME, "sha256": s.SHA256,
                    "json": s.decoded(state_outline, TRAINING_STATE, "is not a training state")}),
    "monitor": s.MONITOR,
    "dataset": s.DATASET,
    "metrics": s.obj(),
    "config": s.CONFIG,
    "versions": s.obj(),
    "imported": s.obj(),
    "label_encoding": s.LABEL_ENCODING,
    "created": s.TIMESTAMP,
    "step": s.integer(),
    "train_loss": s.nullable(s.number(finite=False)),
    "calibration": s.CALIBRATION,
    "operating_point": s.OPERATING_POINT,
    "distillation": DISTILLATION,
    "metadata": s.METADATA,  # the patient metadata a fusion model reads (dermcam.metadata_spec)
    "tracking": s.TRACKING,  # where the run is tracked (TensorBoard folder, MLflow run); dermcam.track
}), s.fits_classes)


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
        return contained(self.run_dir, self.sidecar["weights"]["file"], "weights file")

    @property
    def state_path(self) -> Path | None:
        state = self.sidecar.get("state")
        return contained(self.run_dir, state["file"], "state file") if state else None

    @property
    def monitor(self) -> dict[str, Any]:
        return self.sidecar.get("monitor") or {}

    @property
    def monitor_value(self) -> float | None:
        value = self.monitor.get("value")
        return None if value is None else float(value)

    @property
    def monitor_mode(self) -> str:
        return str(self.monitor.get("mode", "max"))

    @property
    def rank_group(self) -> RankGroup:
        """What this checkpoint may be ranked against (see :func:`best_of`)."""
        return RankGroup((self.sidecar.get("dataset") or {}).get("name"), tuple(self.sidecar["classes"]),
                         self.monitor.get("name"))

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
        created=utc_now("microseconds"),  # "newest" decides what best ranks against (see ranked_group)
    )
    if train_state is not None:
        state_file = f"{stem}.state.safetensors"
        skeleton, tensors = split_state(train_state)
        state_sha = save_tensors(run_dir / state_file, tensors)
        full["state"] = {"file": state_file, "sha256": state_sha, "json": skeleton}
    atomic_write_json(sidecar_path, full)
    return Checkpoint(sidecar_path, full)


def annotate_checkpoint(ckpt: Checkpoint, fields: Mapping[str, Any], *, root: Path | None = None) -> Checkpoint:
    """Add descriptive ``fields`` (calibration, operating point) to a checkpoint's sidecar.

    Why the sidecar and not a file beside it: the sidecar is the one document every command already
    reads, validates, exports, imports and deletes with the checkpoint, so a calibration stored there
    travels with ``ckpt export``/``restore``, is checked by ``ckpt verify``, goes with ``prune`` and can
    never outlive or be mistaken for another checkpoint's (a separate file would need all of that again,
    and a rollback that rewrites the epoch would leave it describing weights that are gone).

    Crash-safe: the new sidecar is validated, then written beside the old one and renamed over it
    (:func:`atomic_write_json`), so a crash leaves the old or the new sidecar, both complete and
    valid; the weights and their hashes are untouched. Under the shared store lock, so ``prune``
    (exclusive) cannot remove the checkpoint half-way; the sidecar is read again under the lock and
    must still describe the same weights, else nothing is written.
    """
    with store_lock("store", shared=True, root=root):
        if not ckpt.sidecar_path.is_file():
            raise NotFoundError(f"checkpoint {ckpt.id} was removed (pruned?) before its sidecar could be updated")
        current = read_checkpoint(ckpt.sidecar_path)
        if current.sidecar["weights"]["sha256"] != ckpt.sidecar["weights"]["sha256"]:
            raise CorruptError(f"checkpoint {ckpt.id} was replaced while it was being calibrated (its weights "
                               "changed); nothing was written")
        updated = {**current.sidecar, **fields}
        s.validate(updated, SIDECAR, f"{ckpt.sidecar_path}: updated sidecar")
        atomic_write_json(ckpt.sidecar_path, updated)
    return Checkpoint(ckpt.sidecar_path, updated)


def read_json_document(path: Path, check: s.Check, what: str) -> Any:
    """A JSON file validated against ``check``; CorruptError (one line) when unreadable or invalid."""
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:
        raise CorruptError(f"{path} is not readable JSON ({exc}) (damaged or modified)") from None
    s.validate(data, check, f"{path}: {what}")
    return data


def read_checkpoint(sidecar_path: Path) -> Checkpoint:
    """Parse and validate a sidecar; CorruptError when it is not a usable checkpoint stored where it lies
    (:func:`check_usable`)."""
    sidecar_path = Path(sidecar_path)
    ckpt = Checkpoint(sidecar_path, read_json_document(sidecar_path, SIDECAR, "sidecar"))
    check_usable(ckpt)
    return ckpt


def check_usable(ckpt: Checkpoint) -> None:
    """The one test of "this checkpoint can answer": everything short of hashing its weights.

    Its sidecar names its own folder and epoch; its weights file is there, of the size the sidecar
    records, and holds exactly the sidecar's backbone with one output per class (names, shapes and
    dtypes from the safetensors header; no tensor is read). Every command reads a checkpoint through
    :func:`read_checkpoint`, so ``ckpt list``/``prune``/``verify``, ``best``/``latest`` and the loaders of
    evaluate, explain, export and ensembles agree on what is damaged: a sidecar whose backbone this timm
    does not know, or whose classes do not fit its weights, is damaged everywhere, not only once a model
    is built (verify adds the hashes, which loading checks too).
    """
    _check_location(ckpt)
    weights = ckpt.weights_path
    if not weights.is_file():
        raise CorruptError(f"{ckpt.sidecar_path}: its weights file {weights.name} is missing")
    size = ckpt.sidecar["weights"].get("size")
    if size is not None and weights.stat().st_size != size:
        raise CorruptError(f"{ckpt.sidecar_path}: its weights file {weights.name} has {weights.stat().st_size} "
                           f"bytes, the sidecar says {size} (damaged or modified)")
    backbone, classes = ckpt.sidecar["backbone"], ckpt.sidecar["classes"]
    metadata = ckpt.sidecar.get("metadata")
    try:
        expected = backbone_tensors(backbone, len(classes),
                                    None if metadata is None else json.dumps(metadata, sort_keys=True))
    except DermcamError as exc:
        raise CorruptError(f"{ckpt.sidecar_path}: {exc} (damaged or modified, or written with another timm "
                           "version)") from None
    try:
        check_tensors(weights, tensor_header(weights), expected, backbone)
    except CorruptError as exc:
        raise CorruptError(f"{ckpt.sidecar_path}: its weights are not backbone {backbone} with {len(classes)} "
                           f"classes ({exc})") from None


@functools.lru_cache(maxsize=16)
def backbone_tensors(backbone: str, num_classes: int, metadata: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``backbone`` with ``num_classes`` outputs as meta tensors (names, shapes and
    dtypes, no memory), once per process per backbone. An unknown name is
    :func:`dermcam.models.backbones.build_model`'s BadInputError. ``metadata``: the sidecar's metadata
    spec as JSON text (hashable, for the cache): the fusion model it describes.

    Built on the CPU and moved, not built under ``torch.device("meta")``: that context imports
    ``torch._dynamo`` (3 s on the 2-core VM, what :mod:`dermcam.models.timm_import` defers), while a
    CPU build of efficientnet_lite0 takes 0.1 s."""
    from dermcam.models.backbones import build_model

    spec = None if metadata is None else json.loads(metadata)
    return {k: v.to("meta") for k, v in build_model(backbone, num_classes, spec).state_dict().items()}


def _check_location(ckpt: Checkpoint) -> None:
    """A sidecar describes the checkpoint of its own folder and epoch, and names that epoch's files.

    Otherwise pruning it would delete another checkpoint's weights, and a rollback would move another
    run's resume pointer.
    """
    stem = epoch_stem(ckpt.epoch)
    state = ckpt.sidecar.get("state")
    expected = (ckpt.run_id == ckpt.run_dir.name and ckpt.id == f"{ckpt.run_id}:{ckpt.epoch}"
                and ckpt.sidecar_path.name == f"{stem}.json"
                and ckpt.sidecar["weights"]["file"] == f"{stem}.safetensors"
                and (state is None or state["file"] == f"{stem}.state.safetensors"))
    if not expected:
        raise CorruptError(f"{ckpt.sidecar_path} names checkpoint {ckpt.id}, which is not where it is stored "
                           "(damaged or modified)")


@dataclass(frozen=True)
class Damage:
    """A stored document that failed validation: where, what is wrong, and whose it is."""

    path: Path
    problem: str
    run_id: str
    epoch: int | None = None  # from the sidecar's file name; None for run-level files

    @property
    def id(self) -> str:
        return self.run_id if self.epoch is None else f"{self.run_id}:{self.epoch}"


def scan_run(run_dir: Path) -> tuple[list[Checkpoint], list[Damage]]:
    """Complete checkpoints of one run (by epoch), and the sidecars that are damaged.

    Listing, pruning and verifying all read a run through here, so they agree on what is damaged.
    """
    run_dir = Path(run_dir)
    found: list[Checkpoint] = []
    damaged: list[Damage] = []
    for path in sorted(run_dir.glob("epoch-*.json")):
        match = _EPOCH_FILE.match(path.name)
        if not match:
            continue
        try:
            found.append(read_checkpoint(contained(run_dir, path.name, "sidecar")))
        except CorruptError as exc:
            damaged.append(Damage(path, str(exc), run_dir.name, int(match.group(1))))
    return sorted(found, key=lambda c: c.epoch), damaged


def run_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of one run, by epoch. Incomplete or damaged ones are skipped here."""
    return scan_run(run_dir)[0]


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


@dataclass(frozen=True)
class RankGroup:
    """Checkpoints whose monitored values can be compared: same data set, classes and metric."""

    dataset: str | None
    classes: tuple[str, ...]
    monitor: str | None

    def __str__(self) -> str:
        return f"{self.monitor or '?'} on data set {self.dataset or '?'} ({', '.join(self.classes)})"


def ranked_group(checkpoints: Iterable[Checkpoint]) -> RankGroup | None:
    """The group ``best`` ranks in: that of the newest checkpoint with a monitored value.

    A balanced accuracy on another data set or class set, or a val_loss, says nothing about whether
    a checkpoint is better, so only checkpoints comparable to the one trained last compete.
    """
    scored = [c for c in checkpoints if c.monitor_value is not None]
    if not scored:
        return None
    return max(scored, key=lambda c: (c.sidecar.get("created", ""), c.epoch)).rank_group


def best_of(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    """The best checkpoint by its monitored metric, among those in :func:`ranked_group`."""
    ckpts = list(checkpoints)
    group = ranked_group(ckpts)
    best: Checkpoint | None = None
    for ckpt in ckpts:
        if ckpt.rank_group == group and better(ckpt, best):
            best = ckpt
    return best


def rank_key(ckpt: Checkpoint) -> float:
    """Sort key: smaller is better, whatever the metric's direction."""
    value = ckpt.monitor_value
    if value is None:
        return float("inf")
    return value if ckpt.monitor_mode == "min" else -value
