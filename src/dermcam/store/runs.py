"""Training runs in the store: ``runs/<run_id>/run.json`` (config, status, resume pointer) and ``metrics.jsonl``.

Both are validated when read (:data:`RUN`, :data:`METRICS_LINE`): a run whose ``run.json`` is damaged
is reported and left alone by every command, a damaged metrics line is skipped.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store import schema as s
from dermcam.store.checkpoint import Checkpoint, Damage, best_of, read_json_document, run_checkpoints, scan_run
from dermcam.store.files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, leftover_temporaries, utc_now
from dermcam.store.paths import contained, runs_dir

RUN_SCHEMA = "dermcam.run/1"

RUN = s.obj({
    "schema": s.one_of(RUN_SCHEMA),
    "run_id": s.NAME,
    "created": s.TIMESTAMP,
    "status": s.text(min_len=1, max_len=32),
    "config": s.CONFIG,
}, optional={
    # checkpoints of this run (read_run checks the run part): a pointer is a name, never a path
    "resume_from": s.nullable(s.CHECKPOINT_ID),
    "best": s.nullable(s.CHECKPOINT_ID),
    "imported": s.obj(),
    "test_metrics": s.nullable(s.obj()),
    "stopped_early": s.boolean,
    "tracking": s.TRACKING,  # where the run is tracked; resume reopens the same MLflow run (dermcam.track)
})

METRICS_LINE = s.obj({"epoch": s.EPOCH})


def run_folders(root: Path | None = None) -> tuple[list[Path], list[Damage]]:
    """Every folder under ``runs/`` (hidden ones excepted), and the entries that lead outside the store
    (a symlink elsewhere): those are reported and never entered, so nothing there is read or deleted."""
    base = runs_dir(root)
    folders: list[Path] = []
    damaged: list[Damage] = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            folders.append(contained(base, path.name, "run folder"))
        except CorruptError as exc:
            damaged.append(Damage(path, str(exc), path.name))
    return folders, damaged


def scan_runs(root: Path | None = None) -> tuple[list[Path], list[Damage]]:
    """Runs with a valid ``run.json`` (oldest first), and those whose ``run.json`` or folder is damaged.

    Folders without a ``run.json`` are not runs (see :func:`creation_leftover`).
    """
    folders, damaged = run_folders(root)
    runs, bad = _checked([p for p in folders if (p / "run.json").is_file()])
    return runs, damaged + bad


def _checked(folders: list[Path]) -> tuple[list[Path], list[Damage]]:
    """(runs whose ``run.json`` is valid, by creation time; the damage of the others)."""
    runs: list[tuple[str, Path]] = []
    damaged: list[Damage] = []
    for path in folders:
        try:
            runs.append((read_run(path)["created"], path))
        except CorruptError as exc:
            damaged.append(Damage(path / "run.json", str(exc), path.name))
    return [p for _, p in sorted(runs, key=lambda r: (r[0], r[1].name))], damaged


def list_runs(root: Path | None = None) -> list[Path]:
    """Runs with a valid ``run.json``, oldest first; damaged ones are left out (``ckpt verify`` names them)."""
    return scan_runs(root)[0]


def scan_checkpoints(root: Path | None = None, run: str | None = None) -> tuple[list[Checkpoint], list[Damage]]:
    """Every complete checkpoint (or one run's), and everything damaged on the way: what list and
    prune show. A run with a damaged ``run.json`` contributes its damage, never its checkpoints."""
    runs, damaged = _checked([find_run(run, root)]) if run else scan_runs(root)
    ckpts: list[Checkpoint] = []
    for run_dir in runs:
        found, bad = scan_run(run_dir)
        ckpts += found
        damaged += bad
    return ckpts, damaged


def list_checkpoints(root: Path | None = None, run: str | None = None) -> list[Checkpoint]:
    return scan_checkpoints(root, run)[0]


def new_run_id() -> str:
    return secrets.token_hex(3)


def create_run(config: dict[str, Any], root: Path | None = None, run_id: str | None = None) -> Path:
    run_id = run_id or new_run_id()
    path = contained(runs_dir(root), run_id, "run id", BadInputError)
    path.mkdir(parents=True, exist_ok=False)
    # Microseconds: runs created in the same second (a comparison of configurations) keep their order.
    atomic_write_json(path / "run.json", {"schema": RUN_SCHEMA, "run_id": run_id, "created": utc_now("microseconds"),
                                          "status": "running", "config": config, "resume_from": None})
    return path


def read_run(run_dir: Path) -> dict[str, Any]:
    """``run.json``, validated; it must name the folder it is in (a copy elsewhere is not that run)."""
    run_dir = Path(run_dir)
    data = read_json_document(run_dir / "run.json", RUN, "run.json")
    _check_own(data, run_dir)
    return data


def _check_own(data: dict[str, Any], run_dir: Path) -> None:
    """A run.json names its own folder, and its checkpoint pointers name its own checkpoints: a
    ``resume_from`` of another run would make ``train --resume`` continue someone else's training."""
    if data["run_id"] != run_dir.name:
        raise CorruptError(f"{run_dir}/run.json belongs to run {data['run_id']}, not {run_dir.name} "
                           "(damaged or modified)")
    for key in ("resume_from", "best"):
        pointer = data.get(key)
        if pointer is not None and pointer.rpartition(":")[0] != run_dir.name:
            raise CorruptError(f"{run_dir}/run.json: field '{key}' names checkpoint {pointer} of another run "
                               "(damaged or modified)")


def update_run(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Change fields of ``run.json``; the result is validated like a read one before it is written."""
    run_dir = Path(run_dir)
    data = {**read_run(run_dir), **fields}
    s.validate(data, RUN, f"{run_dir / 'run.json'}: updated run.json")
    _check_own(data, run_dir)
    atomic_write_json(run_dir / "run.json", data)
    return data


def find_run(run: str, root: Path | None = None) -> Path:
    """A run by id or unique id prefix (a name: ``--run ../x`` is refused, never followed).

    A run whose ``run.json`` is damaged is found like any other (by id or prefix), never taken for
    "no such run": the caller reads it (:func:`read_run`) and reports the damage, or lists it.
    """
    base = runs_dir(root)
    exact = contained(base, run, "run id", BadInputError)
    if (exact / "run.json").is_file():
        return exact
    runs, damaged = scan_runs(root)
    runs += [d.path.parent for d in damaged if d.path.name == "run.json"]  # not the folders leading outside
    matches = [p for p in runs if p.name.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(p.name for p in runs) or "none yet"
        raise NotFoundError(f"no run '{run}' in {base} (runs: {known})")
    raise BadInputError(f"run prefix '{run}' is ambiguous: {', '.join(sorted(p.name for p in matches))}")


def is_imported(run_dir: Path) -> bool:
    """A run made by importing an exported file: it has no training state and is never trained in."""
    info = read_run(run_dir)
    return info.get("status") == "imported" or bool(info.get("imported"))


def latest_run(root: Path | None = None) -> Path:
    """The newest run that training can continue (imported runs cannot be)."""
    runs = [r for r in list_runs(root) if not is_imported(r)]
    if not runs:
        raise NotFoundError(f"no resumable training runs in {runs_dir(root)}; start one with: dermcam train")
    return runs[-1]


def resumable_run(run: str | None = None, root: Path | None = None) -> Path:
    """The run ``train --resume`` continues: ``run`` (id or prefix), else :func:`latest_run`.

    Training inside an imported run would start from scratch and overwrite its only checkpoint, so
    naming one is a BadInputError.
    """
    if run is None:
        return latest_run(root)
    run_dir = find_run(run, root)
    if is_imported(run_dir):
        weights = next((str(c.weights_path) for c in run_checkpoints(run_dir)), "PATH")
        raise BadInputError(f"run {run_dir.name} was imported from an exported file and has no training state, "
                            f"so it cannot be resumed; start a new run from its weights with: "
                            f"dermcam train --pretrained {weights}")
    return run_dir


def best_remaining(run_dir: Path, preferred: str) -> Checkpoint | None:
    """Checkpoint ``preferred`` of the run if it still exists, else the best one left (after a prune
    or a rollback removed it), else None."""
    ckpts = run_checkpoints(run_dir)
    return next((c for c in ckpts if c.id == preferred), None) or best_of(ckpts)


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


def _metrics_lines(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.jsonl"
    return [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()] \
        if path.is_file() else []


def _metrics_record(line: str) -> dict[str, Any]:
    """One ``metrics.jsonl`` line, validated; CorruptError when it is damaged."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        raise CorruptError("metrics.jsonl has a line that is not JSON (damaged or modified)") from None
    s.validate(record, METRICS_LINE, "metrics.jsonl line")
    return record


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's metrics to ``metrics.jsonl`` (rewritten atomically; the log is small).

    A previous record of the same epoch (before a rollback) is replaced; damaged lines are kept as
    they are, for the user to look at.
    """
    def same_epoch(line: str) -> bool:
        try:
            return _metrics_record(line)["epoch"] == record.get("epoch")
        except CorruptError:
            return False

    lines = [ln for ln in _metrics_lines(run_dir) if not same_epoch(ln)]
    lines.append(json.dumps(record, default=str))
    atomic_write_bytes(Path(run_dir) / "metrics.jsonl", ("\n".join(lines) + "\n").encode())


def scan_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(valid records in file order, one problem per damaged line)."""
    records, problems = [], []
    for number, line in enumerate(_metrics_lines(run_dir), 1):
        try:
            records.append(_metrics_record(line))
        except CorruptError as exc:
            problems.append(f"{Path(run_dir) / 'metrics.jsonl'} line {number}: {exc}")
    return records, problems


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's per-epoch records; damaged lines are skipped (``ckpt verify`` reports them)."""
    return scan_metrics(run_dir)[0]


def creation_leftover(run_dir: Path) -> bool:
    """A run folder that run creation left when it was killed: nothing in it but (maybe) ``run.json``
    and temporaries. No checkpoint, metrics or report is ever in such a folder, so removing it loses
    nothing; whether it is still being created (fresh, or locked by training) is the caller's check."""
    return all(e.is_file() and (e.name == "run.json" or e.name.endswith(TMP_SUFFIX)) for e in Path(run_dir).iterdir())


def incomplete_files(run_dir: Path) -> list[Path]:
    """Files of interrupted writes: temporaries, and weights/state with no valid sidecar."""
    run_dir = Path(run_dir)
    valid = {p for c in run_checkpoints(run_dir) for p in c.files()}
    orphans = [p for p in run_dir.glob("epoch-*.safetensors") if p not in valid]
    return sorted(set(orphans) | set(leftover_temporaries(run_dir)))
