"""What a user types to name a checkpoint (``RUN:EPOCH``, a run id, a hash prefix, ``best``, ``latest``, a path) -> a :class:`Checkpoint`."""

from __future__ import annotations

import os
from pathlib import Path

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.checkpoint import Checkpoint, best_of, read_checkpoint, run_checkpoints, scan_run
from dermcam.store.paths import runs_dir
from dermcam.store.runs import find_run, list_checkpoints


def resolve(ref: str | Path | None = None, root: Path | None = None) -> Checkpoint:
    """Find a checkpoint by id, run, hash prefix, ``best``/``latest``, or a file path."""
    if ref is not None and (isinstance(ref, Path) or os.sep in str(ref) or str(ref).endswith((".safetensors", ".json"))):
        return checkpoint_from_path(Path(ref))
    ref = None if ref in (None, "", "best") else str(ref)
    if ref is not None and ref.startswith("ensemble:"):  # see dermcam.store.ensembles.PREFIX
        raise BadInputError(f"{ref} is an ensemble; this needs one checkpoint (an ensemble's members are "
                            "calibrated and managed one by one: dermcam ensemble show NAME lists them)")
    if ref is not None and ":" in ref:
        return _by_run(ref, root)
    all_ckpts = list_checkpoints(root)
    if not all_ckpts:
        raise NotFoundError(f"no checkpoints in {runs_dir(root)}; train one with: dermcam train")
    if ref is None:
        best = best_of(all_ckpts)
        return best or all_ckpts[-1]
    if ref == "latest":
        return max(all_ckpts, key=lambda c: c.sidecar.get("created", ""))
    by_hash = [c for c in all_ckpts if len(ref) >= 6 and c.sidecar["weights"]["sha256"].startswith(ref)]
    if len(by_hash) == 1:
        return by_hash[0]
    run_dir = find_run(ref, root)
    best = best_of(run_checkpoints(run_dir))
    if best is None:
        raise NotFoundError(f"run {run_dir.name} has no complete checkpoint yet")
    return best


def _by_run(ref: str, root: Path | None) -> Checkpoint:
    """``RUN:EPOCH``, ``RUN:best`` or ``RUN:latest``; a damaged sidecar of that epoch is reported as such."""
    run, _, epoch = ref.partition(":")
    run_dir = find_run(run, root)
    ckpts, damaged = scan_run(run_dir)
    if epoch == "best":
        found = best_of(ckpts)
    elif epoch == "latest":
        found = ckpts[-1] if ckpts else None
    else:
        number = int(epoch) if epoch.isdigit() else -1
        found = next((c for c in ckpts if c.epoch == number), None)
        problem = next((d.problem for d in damaged if d.epoch == number), None)
        if found is None and problem is not None:
            raise CorruptError(problem)
    if found is None:
        raise NotFoundError(f"no checkpoint '{ref}' (run {run_dir.name} has epochs "
                            f"{', '.join(str(c.epoch) for c in ckpts) or 'none'})")
    return found


def checkpoint_from_path(path: Path) -> Checkpoint:
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    if path.suffix == ".json":
        return read_checkpoint(path)
    sidecar = path.with_suffix("").with_suffix(".json") if path.name.endswith(".state.safetensors") else path.with_suffix(".json")
    if sidecar.is_file():
        return read_checkpoint(sidecar)
    raise BadInputError(f"{path} has no sidecar ({sidecar.name}); for an exported file use it directly "
                        "with explain/evaluate or import it with: dermcam ckpt restore")
