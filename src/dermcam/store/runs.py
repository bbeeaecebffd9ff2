"""Training runs in the store: ``runs/<run_id>/run.json`` (config, status, resume pointer) and ``metrics.jsonl``."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.errors import BadInputError, CorruptError, NotFoundError
from dermcam.store.checkpoint import Checkpoint, run_checkpoints
from dermcam.store.files import atomic_write_bytes, atomic_write_json, leftover_temporaries, read_json, utc_now
from dermcam.store.paths import runs_dir

if TYPE_CHECKING:
    pass

RUN_SCHEMA = "dermcam.run/1"


def list_runs(root: Path | None = None) -> list[Path]:
    base = runs_dir(root)
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and (p / "run.json").is_file()),
                  key=lambda p: (read_run(p).get("created", ""), p.name))


def list_checkpoints(root: Path | None = None, run: str | None = None) -> list[Checkpoint]:
    runs = [find_run(run, root)] if run else list_runs(root)
    return [c for r in runs for c in run_checkpoints(r)]


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
