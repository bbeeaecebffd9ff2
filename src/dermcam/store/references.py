"""What a user types to name a checkpoint (``RUN:EPOCH``, a run id, a hash prefix, ``best``, ``latest``, a path)
-> a :class:`Checkpoint`, and what was passed over on the way (:class:`Resolution`).

A reference that *chooses* (``best``, ``latest``, a run id, ``RUN:best``, ``RUN:latest``, a hash prefix)
chooses among intact checkpoints. A damaged sidecar or ``run.json`` is never followed, and never passed
over in silence either:

- when what it still says shows that it would have been the answer (its JSON parses and its monitored
  value beats the chosen one's, it is newer, its hash has the prefix; or it is the run that was named),
  the reference fails with :class:`CorruptError` (exit code 4) naming the file and what is wrong;
- otherwise the answer comes with one line per damaged thing it passed over
  (:attr:`Resolution.warnings`), which evaluate, explain, report, calibrate and export show.

A reference that names one checkpoint (``RUN:EPOCH``, a path) answers with it or fails; damage
elsewhere does not concern it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.checkpoint import Checkpoint, Damage, best_of, read_checkpoint, scan_run
from dermcam.store.files import read_json
from dermcam.store.paths import runs_dir
from dermcam.store.runs import find_run, read_run, scan_checkpoints

Pick = Callable[[Sequence[Checkpoint]], "Checkpoint | None"]


@dataclass(frozen=True)
class Resolution:
    """A resolved reference: the checkpoint, and the damaged candidates it was chosen over."""

    checkpoint: Checkpoint
    skipped: tuple[Damage, ...] = ()

    @property
    def warnings(self) -> list[str]:
        """One line per damaged thing passed over (what a command shows as ``Warning: ...``)."""
        return [skipped_line(d) for d in self.skipped]


def skipped_line(damage: Damage) -> str:
    """``skipped damaged checkpoint RUN:EPOCH (FILE): PROBLEM`` (the file only when the problem lacks it)."""
    what = "run" if damage.epoch is None else "checkpoint"
    where = "" if str(damage.path) in damage.problem else f" ({damage.path})"
    return f"skipped damaged {what} {damage.id}{where}: {damage.problem}"


def resolve(ref: str | Path | None = None, root: Path | None = None) -> Checkpoint:
    """The checkpoint :func:`find_checkpoint` resolves ``ref`` to (what it skipped is dropped: a
    command that answers a user calls :func:`find_checkpoint` and shows its warnings)."""
    return find_checkpoint(ref, root).checkpoint


def find_checkpoint(ref: str | Path | None = None, root: Path | None = None) -> Resolution:
    """Find a checkpoint by id, run, hash prefix, ``best``/``latest``, or a file path (see the module
    docstring for what happens to damaged candidates)."""
    if ref is not None and (isinstance(ref, Path) or os.sep in str(ref) or str(ref).endswith((".safetensors", ".json"))):
        return Resolution(checkpoint_from_path(Path(ref)))
    ref = None if ref in (None, "", "best") else str(ref)
    if ref is not None and ref.startswith("ensemble:"):  # see dermcam.store.ensembles.PREFIX
        raise BadInputError(f"{ref} is an ensemble; this needs one checkpoint (an ensemble's members are "
                            "calibrated and managed one by one: dermcam ensemble show NAME lists them)")
    if ref is not None and ":" in ref:
        return _by_run(ref, root)
    found, damaged = scan_checkpoints(root)
    if not found and not damaged:
        raise NotFoundError(f"no checkpoints in {runs_dir(root)}; train one with: dermcam train")
    if ref is None:
        return _choose("best", found, damaged, best_of, default=lambda cs: cs[-1])
    if ref == "latest":
        return _choose("latest", found, damaged, _newest)
    if len(ref) >= 6:
        claimed = [(d, c) for d in damaged for c in _stand_ins(d) if _has_hash(c, ref)]
        if claimed:
            raise _would_be(ref, *claimed[0])
        by_hash = [c for c in found if _has_hash(c, ref)]
        if len(by_hash) == 1:
            return Resolution(by_hash[0])
    return _by_run(f"{ref}:best", root, bare=True)


def _by_run(ref: str, root: Path | None, bare: bool = False) -> Resolution:
    """``RUN:EPOCH``, ``RUN:best`` or ``RUN:latest`` (``bare``: the user typed just RUN). A run whose
    run.json is damaged is damaged whatever of it is asked for; a damaged sidecar of the epoch named
    is reported as such."""
    run, _, epoch = ref.partition(":")
    run_dir = find_run(run, root)
    read_run(run_dir)
    ckpts, damaged = scan_run(run_dir)
    word = run_dir.name if bare else f"{run_dir.name}:{epoch}"
    if epoch in ("best", "latest"):
        if not ckpts and not damaged:
            raise NotFoundError(f"run {run_dir.name} has no complete checkpoint yet")
        return _choose(word, ckpts, damaged, best_of if epoch == "best" else _last_epoch)
    number = int(epoch) if epoch.isdigit() else -1
    found = next((c for c in ckpts if c.epoch == number), None)
    problem = next((d.problem for d in damaged if d.epoch == number), None)
    if found is None and problem is not None:
        raise CorruptError(problem)
    if found is None:
        raise NotFoundError(f"no checkpoint '{ref}' (run {run_dir.name} has epochs "
                            f"{', '.join(str(c.epoch) for c in ckpts) or 'none'})")
    return Resolution(found)


def _choose(word: str, found: list[Checkpoint], damaged: list[Damage], pick: Pick,
            default: Pick | None = None) -> Resolution:
    """``pick(found)`` (else ``default(found)``), unless ``pick`` would have chosen a damaged candidate
    (a stand-in of what its file still says, :func:`_stand_ins`): then CorruptError naming it."""
    for damage in damaged:
        for stand_in in _stand_ins(damage):
            if pick([*found, stand_in]) is stand_in:
                raise _would_be(word, damage, stand_in)
    chosen = pick(found) or (default(found) if default and found else None)
    if chosen is None:
        if damaged:
            raise CorruptError(f"no intact checkpoint to take for '{word}': {damaged[0].problem}")
        raise NotFoundError(f"no checkpoint for '{word}': none has a monitored value to rank by")
    return Resolution(chosen, tuple(damaged))


def _would_be(word: str, damage: Damage, stand_in: Checkpoint) -> CorruptError:
    where = "of a damaged run" if damage.epoch is None else "which is damaged"
    return CorruptError(f"'{word}' would be checkpoint {stand_in.id}, {where}: {damage.problem}")


def _newest(ckpts: Sequence[Checkpoint]) -> Checkpoint | None:
    return max(ckpts, key=lambda c: c.sidecar.get("created", ""), default=None)


def _last_epoch(ckpts: Sequence[Checkpoint]) -> Checkpoint | None:
    return max(ckpts, key=lambda c: c.epoch, default=None)


def _has_hash(ckpt: Checkpoint, prefix: str) -> bool:
    return str(ckpt.sidecar["weights"]["sha256"]).startswith(prefix)


def _stand_ins(damage: Damage) -> list[Checkpoint]:
    """What a damaged thing could have contributed to a choice, as checkpoints never loaded or followed.

    A run with a damaged run.json: its intact checkpoints. A damaged sidecar whose JSON still parses
    to an object: a stand-in holding only the fields that rank, date or identify a checkpoint, each
    kept only when well-formed (a NaN value or a garbled date ranks nothing). A run folder leading
    outside the store is never entered, and garbled JSON says nothing: no stand-ins.
    """
    if damage.epoch is None:
        run_dir = damage.path.parent
        return scan_run(run_dir)[0] if damage.path.name == "run.json" else []
    try:
        doc = read_json(damage.path)
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(doc, dict):
        return []
    monitor = _dict(doc.get("monitor"))
    value = monitor.get("value")
    classes = doc.get("classes")
    return [Checkpoint(damage.path, {
        "id": damage.id, "epoch": damage.epoch,
        "created": _text(doc.get("created")),
        "classes": classes if isinstance(classes, list) and all(isinstance(c, str) for c in classes) else [],
        "dataset": {"name": _text(_dict(doc.get("dataset")).get("name")) or None},
        "monitor": {"name": _text(monitor.get("name")) or None,
                    "mode": "min" if monitor.get("mode") == "min" else "max",
                    "value": value if _finite(value) else None},
        "weights": {"sha256": _text(_dict(doc.get("weights")).get("sha256"))},
    })]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checkpoint_from_path(path: Path) -> Checkpoint:
    """The checkpoint a sidecar or weights file belongs to; in a run folder with a damaged run.json it
    is damaged, as when it is named by id."""
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    if path.suffix == ".json":
        sidecar = path
    else:
        sidecar = path.with_suffix("").with_suffix(".json") if path.name.endswith(".state.safetensors") \
            else path.with_suffix(".json")
        if not sidecar.is_file():
            raise BadInputError(f"{path} has no sidecar ({sidecar.name}); for an exported file use it directly "
                                "with explain/evaluate or import it with: dermcam ckpt restore")
    ckpt = read_checkpoint(sidecar)
    if (ckpt.run_dir / "run.json").is_file():
        read_run(ckpt.run_dir)
    return ckpt
