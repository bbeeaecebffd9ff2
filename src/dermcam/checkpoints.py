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

import datetime as _dt
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam import __version__
from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store import (atomic_path, atomic_write_bytes, atomic_write_json, leftover_temporaries, read_json,
                           runs_dir)

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA = "dermcam.checkpoint/1"
RUN_SCHEMA = "dermcam.run/1"
DEFAULT_MONITOR = "val_balanced_accuracy"
_EPOCH_FILE = re.compile(r"^epoch-(\d{4,})\.json$")


# --------------------------------------------------------------------------------------------------
# Small helpers


def utc_now(timespec: str = "seconds") -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import timm
    import torch

    return {"dermcam": __version__, "torch": torch.__version__, "timm": timm.__version__}


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as safetensors; returns the file's sha256."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), optionally checking its sha256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise NotFoundError(f"missing weights file {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CorruptError(f"{path} does not match the sha256 in its sidecar (damaged or modified)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptError(f"{path} is not a readable safetensors file ({exc})") from None


# --------------------------------------------------------------------------------------------------
# Training state (optimizer, EMA, RNG ...) as safetensors + JSON


def split_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tensors, numpy arrays, scalars) into JSON and tensors.

    Tensors are replaced by ``{"__tensor__": key}``, numpy arrays by ``{"__ndarray__": key}``; tuples become
    lists (callers that need tuples rebuild them). This is how resume state is stored without pickle.
    """
    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu()
            return {"__tensor__": path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": path}
        if isinstance(value, Mapping):
            return {"__map__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} without pickle")

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__map__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__map__"]}
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


# --------------------------------------------------------------------------------------------------
# Checkpoints


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


def list_runs(root: Path | None = None) -> list[Path]:
    base = runs_dir(root)
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and (p / "run.json").is_file()),
                  key=lambda p: (read_run(p).get("created", ""), p.name))


def list_checkpoints(root: Path | None = None, run: str | None = None) -> list[Checkpoint]:
    runs = [find_run(run, root)] if run else list_runs(root)
    return [c for r in runs for c in run_checkpoints(r)]


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


# --------------------------------------------------------------------------------------------------
# Runs


def new_run_id() -> str:
    return secrets.token_hex(3)


def create_run(config: dict[str, Any], root: Path | None = None, run_id: str | None = None) -> Path:
    run_id = run_id or new_run_id()
    path = runs_dir(root) / run_id
    path.mkdir(parents=True, exist_ok=False)
    # Microseconds: runs created in the same second (a comparison of configurations) keep their order.
    atomic_write_json(path / "run.json", {"schema": RUN_SCHEMA, "run_id": run_id, "created": utc_now("microseconds"),
                                          "status": "running", "config": config, "resume_from": None})
    return path


def read_run(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(Path(run_dir) / "run.json")
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{run_dir}/run.json is unreadable ({exc})") from None


def update_run(run_dir: Path, **fields: Any) -> dict[str, Any]:
    data = read_run(run_dir)
    data.update(fields)
    atomic_write_json(Path(run_dir) / "run.json", data)
    return data


def find_run(run: str, root: Path | None = None) -> Path:
    """A run by id or unique id prefix."""
    base = runs_dir(root)
    exact = base / run
    if (exact / "run.json").is_file():
        return exact
    matches = [p for p in list_runs(root) if p.name.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(p.name for p in list_runs(root)) or "none yet"
        raise NotFoundError(f"no run '{run}' in {base} (runs: {known})")
    raise BadInputError(f"run prefix '{run}' is ambiguous: {', '.join(p.name for p in matches)}")


def latest_run(root: Path | None = None) -> Path:
    runs = list_runs(root)
    if not runs:
        raise NotFoundError(f"no training runs in {runs_dir(root)}; start one with: dermcam train")
    return runs[-1]


def resume_point(run_dir: Path) -> Checkpoint | None:
    """The checkpoint ``train --resume`` continues from: the run's pointer if set, else its latest.

    Training moves the pointer to every checkpoint it saves, so after a rollback (``ckpt restore
    RUN:EPOCH``) the stale later epochs of the old branch are never resumed from.
    """
    ckpts = [c for c in run_checkpoints(run_dir) if c.state_path is not None]
    pointer = read_run(run_dir).get("resume_from")
    if pointer:
        for ckpt in ckpts:
            if ckpt.id == pointer:
                return ckpt
    return ckpts[-1] if ckpts else None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's metrics to ``metrics.jsonl`` (rewritten atomically; the log is small)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    lines = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch") != record.get("epoch")]
    lines.append(json.dumps(record, default=str))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def incomplete_files(run_dir: Path) -> list[Path]:
    """Files of interrupted writes: temporaries, and weights/state with no valid sidecar."""
    run_dir = Path(run_dir)
    valid = {p for c in run_checkpoints(run_dir) for p in c.files()}
    orphans = [p for p in run_dir.glob("epoch-*.safetensors") if p not in valid]
    return sorted(set(orphans) | set(leftover_temporaries(run_dir)))


# --------------------------------------------------------------------------------------------------
# Resolving references and loading for inference


def resolve(ref: str | Path | None = None, root: Path | None = None) -> Checkpoint:
    """Find a checkpoint by id, run, hash prefix, ``best``/``latest``, or a file path."""
    if ref is not None and (isinstance(ref, Path) or os.sep in str(ref) or str(ref).endswith((".safetensors", ".json"))):
        return _checkpoint_from_path(Path(ref))
    ref = None if ref in (None, "", "best") else str(ref)
    all_ckpts = list_checkpoints(root)
    if not all_ckpts:
        raise NotFoundError(f"no checkpoints in {runs_dir(root)}; train one with: dermcam train")
    if ref is None:
        best = best_of(all_ckpts)
        return best or all_ckpts[-1]
    if ref == "latest":
        return max(all_ckpts, key=lambda c: c.sidecar.get("created", ""))
    if ":" in ref:
        run, _, epoch = ref.partition(":")
        run_dir = find_run(run, root)
        ckpts = run_checkpoints(run_dir)
        if epoch == "best":
            found = best_of(ckpts)
        elif epoch == "latest":
            found = ckpts[-1] if ckpts else None
        else:
            found = next((c for c in ckpts if epoch.isdigit() and c.epoch == int(epoch)), None)
        if found is None:
            raise NotFoundError(f"no checkpoint '{ref}' (run {run_dir.name} has epochs "
                                f"{', '.join(str(c.epoch) for c in ckpts) or 'none'})")
        return found
    by_hash = [c for c in all_ckpts if len(ref) >= 6 and c.sidecar["weights"]["sha256"].startswith(ref)]
    if len(by_hash) == 1:
        return by_hash[0]
    run_dir = find_run(ref, root)
    best = best_of(run_checkpoints(run_dir))
    if best is None:
        raise NotFoundError(f"run {run_dir.name} has no complete checkpoint yet")
    return best


def _checkpoint_from_path(path: Path) -> Checkpoint:
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    if path.suffix == ".json":
        return read_checkpoint(path)
    sidecar = path.with_suffix("").with_suffix(".json") if path.name.endswith(".state.safetensors") else path.with_suffix(".json")
    if sidecar.is_file():
        return read_checkpoint(sidecar)
    raise BadInputError(f"{path} has no sidecar ({sidecar.name}); for an exported file use it directly "
                        "with explain/evaluate or import it with: dermcam ckpt restore")


def model_from_checkpoint(ckpt: Checkpoint, verify: bool = True) -> torch.nn.Module:
    """Build the sidecar's backbone and load the checkpoint's weights (strict: shapes must match)."""
    from dermcam.models import build_model

    model = build_model(ckpt.sidecar["backbone"], len(ckpt.sidecar["classes"]))
    state = ckpt.load_weights(verify=verify)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptError(f"checkpoint {ckpt.id} does not fit backbone {ckpt.sidecar['backbone']}: "
                           f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_for_inference(ref: str | Path | None = None, root: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, sidecar) for a store checkpoint or a self-contained exported file."""
    if ref is not None and Path(str(ref)).is_file() and not Path(str(ref)).with_suffix(".json").is_file():
        from dermcam.export import load_exported

        return load_exported(Path(str(ref)))
    ckpt = resolve(ref, root)
    return model_from_checkpoint(ckpt), ckpt.sidecar


def preprocess(image: Any, preprocessing: Mapping[str, Any]) -> torch.Tensor:
    """PIL image -> normalised (3,H,W) float tensor, exactly as evaluation sees images.

    The whole image is resized to the model's input size (no centre crop): lesions are not always
    centred, and training's validation path does the same.
    """
    import numpy as np

    from dermcam.augment import normalize, resize, to_float

    _, height, width = preprocessing["input_size"]
    array = np.array(image.convert("RGB"), dtype=np.uint8)[None]  # a writable copy for torch
    x = resize(to_float(array), (height, width))
    return normalize(x, preprocessing["mean"], preprocessing["std"])[0]
