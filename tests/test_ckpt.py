"""dermcam ckpt list / prune / restore (rollback) / verify, through the CLI on tiny timm checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dermcam.cli import app
from dermcam.store.checkpoint import run_checkpoints, save_checkpoint
from dermcam.store.locks import store_lock
from dermcam.store.paths import home
from dermcam.store.runs import create_run, find_run, read_run, resume_point, update_run

BACKBONE = "test_efficientnet"
CLASSES = ["nv", "bkl", "mel"]
_STATE: dict = {}


def model_state() -> dict:
    """Weights of one tiny random timm model (built once: every test reuses them)."""
    if not _STATE:
        import timm
        import torch

        torch.manual_seed(0)
        _STATE.update(timm.create_model(BACKBONE, num_classes=len(CLASSES)).state_dict())
    return _STATE


def sidecar(value: float, monitor: str = "val_balanced_accuracy", epoch: int = 0) -> dict:
    """A realistic sidecar (what training writes) whose monitored metric is ``value``."""
    metrics = {"loss": value if monitor == "val_loss" else round(1.5 - value, 4), "accuracy": value, "balanced_accuracy": value,
               "macro_f1": round(value - 0.05, 4), "recall_nv": value, "recall_bkl": value,
               "recall_mel": round(value - 0.1, 4), "auc_macro": round(min(1.0, value + 0.05), 4),
               "confusion_matrix": [[5, 1, 0], [1, 4, 1], [0, 2, 4]]}
    key = monitor.removeprefix("val_")
    return {"backbone": BACKBONE, "classes": CLASSES, "label_encoding": {c: i for i, c in enumerate(CLASSES)},
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406],
                              "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"},
            "metrics": metrics,
            "monitor": {"name": monitor, "mode": "min" if key == "loss" else "max", "value": metrics[key]},
            "config": {"backbone": BACKBONE, "epochs": 10, "lr": 0.001, "monitor": monitor, "dataset": "tiny"},
            "dataset": {"name": "tiny", "fingerprint": "f00d"}, "step": 10 * (epoch + 1)}


def make_run(run_id: str, values: list[float], monitor: str = "val_balanced_accuracy") -> Path:
    """A run with one checkpoint per epoch (weights + training state + sidecar), monitor = values[epoch]."""
    import torch

    run_dir = create_run({"backbone": BACKBONE, "monitor": monitor}, run_id=run_id)
    for epoch, value in enumerate(values):
        state = {"epoch": epoch, "step": 10 * (epoch + 1), "optimizer": {"lr": 0.001, "m": torch.full((4,), epoch)}}
        save_checkpoint(run_dir, epoch=epoch, model_state=model_state(), sidecar=sidecar(value, monitor, epoch),
                        train_state=state)
    return run_dir


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: the store's exact content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def epochs(run_dir: Path) -> list[int]:
    return [c.epoch for c in run_checkpoints(run_dir)]


def invoke(runner, *args: str, input: str | None = None):
    """``dermcam ckpt ARGS`` in a 200-column terminal (rich wraps tables to the width)."""
    return runner.invoke(app, ["ckpt", *args], input=input, env={"COLUMNS": "200"})


def list_json(runner, *args: str) -> list[dict]:
    result = invoke(runner, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------------ list


def test_list_table_json_sort_and_flags(runner) -> None:
    make_run("aaa111", [0.50, 0.80, 0.60])
    make_run("bbb222", [0.70, 0.90])

    rows = list_json(runner)
    assert [r["id"] for r in rows] == ["aaa111:0", "aaa111:1", "aaa111:2", "bbb222:0", "bbb222:1"]
    flags = {r["id"]: r["flags"] for r in rows}
    assert flags["bbb222:1"] == ["best", "run-best", "latest"]
    assert flags["aaa111:1"] == ["run-best"]
    assert flags["aaa111:2"] == ["latest"]
    assert flags["aaa111:0"] == []
    first = rows[0]
    assert first["backbone"] == BACKBONE and first["dataset"] == "tiny" and first["resumable"]
    assert first["metrics"]["recall_mel"] == 0.4 and "confusion_matrix" not in first["metrics"]
    assert first["size"] == sum(p.stat().st_size for p in (home() / "runs" / "aaa111").glob("epoch-0000*"))

    by_f1 = list_json(runner, "--sort", "macro_f1")
    assert [r["id"] for r in by_f1][:2] == ["bbb222:1", "aaa111:1"]
    by_loss = list_json(runner, "--sort", "val_loss")  # losses sort ascending: best first too
    assert by_loss[0]["id"] == "bbb222:1"
    only_a = list_json(runner, "--run", "aaa")
    assert {r["run_id"] for r in only_a} == {"aaa111"}
    assert not any("best" in r["flags"] for r in only_a)  # best overall is in the other run

    table = invoke(runner, "list")
    assert table.exit_code == 0
    for text in ("aaa111:2", "bbb222:1", "0.900", "run-best", "latest", BACKBONE):
        assert text in table.stdout

    bad = invoke(runner, "list", "--sort", "nonsense")
    assert bad.exit_code == 2 and "macro_f1" in bad.stderr


def test_list_empty_store(runner) -> None:
    result = invoke(runner, "list")
    assert result.exit_code == 0 and "No checkpoints" in result.stdout
    assert list_json(runner) == []


# ------------------------------------------------------------------------------------------------ prune


def test_prune_keeps_best_and_latest_and_reports_bytes(runner) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6, 0.7, 0.4])
    sizes = {c.id: c.size_bytes() for c in run_checkpoints(run)}

    result = invoke(runner, "prune", "--keep-best", "1", "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(r["id"] for r in report["removed"]) == ["aaa111:0", "aaa111:2", "aaa111:3"]
    assert report["bytes_freed"] == sizes["aaa111:0"] + sizes["aaa111:2"] + sizes["aaa111:3"]
    assert {k["id"]: k["reasons"] for k in report["kept"]} == {"aaa111:1": ["best"], "aaa111:4": ["latest"]}
    assert epochs(run) == [1, 4]
    # weights, state and sidecar all gone
    assert sorted(p.name for p in run.glob("epoch-*")) == [
        "epoch-0001.json", "epoch-0001.safetensors", "epoch-0001.state.safetensors",
        "epoch-0004.json", "epoch-0004.safetensors", "epoch-0004.state.safetensors"]


def test_prune_dry_run_changes_nothing(runner) -> None:
    make_run("aaa111", [0.5, 0.9, 0.6, 0.7])
    before = snapshot(home())
    result = invoke(runner, "prune", "--keep-best", "1", "--dry-run")
    assert result.exit_code == 0
    assert "Would remove 2" in result.stdout and "dry run" in result.stdout
    assert snapshot(home()) == before


def test_prune_keep_last_and_no_keep_latest(runner) -> None:
    run = make_run("aaa111", [0.9, 0.5, 0.6, 0.7, 0.4])
    assert invoke(runner, "prune", "--keep-best", "1", "--keep-last", "2", "--yes").exit_code == 0
    assert epochs(run) == [0, 3, 4]
    assert invoke(runner, "prune", "--keep-best", "1", "--no-keep-latest", "--yes").exit_code == 0
    assert epochs(run) == [0]


def test_prune_per_run_vs_global(runner) -> None:
    a = make_run("aaa111", [0.5, 0.6, 0.4])
    b = make_run("bbb222", [0.8, 0.9, 0.7])
    assert invoke(runner, "prune", "--keep-best", "1", "--no-keep-latest", "--yes").exit_code == 0
    assert (epochs(a), epochs(b)) == ([1], [1])
    assert invoke(runner, "prune", "--keep-best", "1", "--global", "--no-keep-latest", "--yes").exit_code == 0
    assert (epochs(a), epochs(b)) == ([], [1])


def test_prune_one_run_only_and_global_refuses_mixed_monitors(runner) -> None:
    a = make_run("aaa111", [0.5, 0.6, 0.4])
    b = make_run("bbb222", [0.8, 0.6, 0.7], monitor="val_loss")
    mixed = invoke(runner, "prune", "--keep-best", "1", "--global", "--yes")
    assert mixed.exit_code == 2 and "different metrics" in mixed.stderr
    assert invoke(runner, "prune", "--keep-best", "1", "--run", "bbb", "--no-keep-latest", "--yes").exit_code == 0
    assert (epochs(a), epochs(b)) == ([0, 1, 2], [1])  # val_loss: the lowest is best


def test_prune_never_touches_latest_and_best_of_a_training_run(runner) -> None:
    active = make_run("aaa111", [0.5, 0.9, 0.6, 0.7])
    idle = make_run("bbb222", [0.5, 0.9, 0.6, 0.7])
    with store_lock("run-aaa111"):  # what training holds for its whole life
        result = invoke(runner, "prune", "--keep-best", "0", "--no-keep-latest", "--yes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["active_runs"] == ["aaa111"]
    assert epochs(active) == [1, 3]
    assert epochs(idle) == []


def test_prune_protects_what_a_resumed_training_run_needs_after_a_rollback(runner) -> None:
    run = make_run("aaa111", [0.5, 0.6, 0.7, 0.95, 0.4])
    assert invoke(runner, "restore", "aaa111:1", "--yes").exit_code == 0
    with store_lock("run-aaa111"):
        # training resumed after epoch 1 (clearing the pointer) and rewrote epoch 2; stale epochs 3
        # and 4 are still on disk: 3 outranks what training thinks is best, 4 is the resume point now
        update_run(run, resume_from=None)
        best = {"epoch": 1, "value": 0.6, "id": "aaa111:1"}
        save_checkpoint(run, epoch=2, model_state=model_state(), sidecar=sidecar(0.55, epoch=2),
                        train_state={"epoch": 2, "best": best})
        result = invoke(runner, "prune", "--keep-best", "0", "--no-keep-latest", "--yes", "--json")
    assert result.exit_code == 0, result.output
    kept = {k["id"]: k["reasons"] for k in json.loads(result.stdout)["kept"]}
    assert set(kept) == {"aaa111:1", "aaa111:2", "aaa111:3", "aaa111:4"}
    assert all(reasons == ["training"] for reasons in kept.values())
    assert epochs(run) == [1, 2, 3, 4]


def test_prune_asks_in_a_terminal(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    monkeypatch.setattr("dermcam.cli.ckpt._interactive", lambda: True)
    declined = invoke(runner, "prune", "--keep-best", "1", input="n\n")
    assert declined.exit_code == 0 and "Nothing deleted" in declined.stderr
    assert epochs(run) == [0, 1, 2]
    accepted = invoke(runner, "prune", "--keep-best", "1", input="y\n")
    assert accepted.exit_code == 0 and "Removed 1" in accepted.stdout
    assert epochs(run) == [1, 2]


def test_prune_while_another_process_writes_checkpoints(runner, tmp_path: Path) -> None:
    """Training in another process (same locks) + repeated prunes: every remaining checkpoint is valid."""
    writer = tmp_path / "writer.py"
    writer.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_ckpt import model_state, sidecar
        from dermcam.store.checkpoint import save_checkpoint
        from dermcam.store.locks import store_lock
        from dermcam.store.runs import create_run

        run_dir = create_run({{}}, run_id="live01")
        values = [0.5, 0.8, 0.6, 0.7, 0.65, 0.9, 0.55, 0.6, 0.62, 0.58, 0.61, 0.57]
        with store_lock("run-live01"):
            print("started", flush=True)
            for epoch, value in enumerate(values):
                with store_lock("store", shared=True):
                    save_checkpoint(run_dir, epoch=epoch, model_state=model_state(),
                                    sidecar=sidecar(value, epoch=epoch), train_state={{"epoch": epoch}})
                time.sleep(0.05)
    """))
    make_run("old000", [0.4, 0.3, 0.2])
    proc = subprocess.Popen([sys.executable, str(writer)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "started"
        prunes = 0
        while proc.poll() is None or prunes < 2:
            result = invoke(runner, "prune", "--keep-best", "1", "--yes", "--json")
            assert result.exit_code == 0, result.output
            prunes += 1
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    live = find_run("live01")
    remaining = run_checkpoints(live)
    assert {c.epoch for c in remaining} >= {5, 11}  # best (0.9) and the last written
    for ckpt in remaining:
        ckpt.load_weights(verify=True)
        ckpt.load_state()
    verify = invoke(runner, "verify", "--json")
    assert verify.exit_code == 0, verify.output
    report = json.loads(verify.stdout)
    assert report["damaged"] == [] and report["incomplete"] == []


# ------------------------------------------------------------------------------------------------ rollback


def test_restore_checkpoint_sets_resume_point_and_keeps_later(runner) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6, 0.7])
    assert resume_point(run).epoch == 3
    result = invoke(runner, "restore", "aaa111:1", "--yes")
    assert result.exit_code == 0, result.output
    assert "resumes from aaa111:1" in result.stdout and "stay until training overwrites them" in result.stdout
    assert read_run(run)["resume_from"] == "aaa111:1"
    assert resume_point(run).id == "aaa111:1"
    assert epochs(run) == [0, 1, 2, 3]
    flags = {r["id"]: r["flags"] for r in list_json(runner)}
    assert "latest" in flags["aaa111:1"] and "latest" not in flags["aaa111:3"]

    # prune keeps the rollback target as the run's resume point
    assert invoke(runner, "prune", "--keep-best", "0", "--yes").exit_code == 0
    assert epochs(run) == [1]


def test_restore_checkpoint_refused_while_training_or_without_state(runner) -> None:
    run = make_run("aaa111", [0.5, 0.9])
    with store_lock("run-aaa111"):
        locked = invoke(runner, "restore", "aaa111:0", "--yes")
    assert locked.exit_code == 6 and "training right now" in locked.stderr
    save_checkpoint(run, epoch=2, model_state=model_state(), sidecar=sidecar(0.3))  # no training state
    stateless = invoke(runner, "restore", "aaa111:2", "--yes")
    assert stateless.exit_code == 2 and "cannot be resumed" in stateless.stderr
    missing = invoke(runner, "restore", "aaa111:7", "--yes")
    assert missing.exit_code == 3
    assert read_run(run)["resume_from"] is None


def test_restore_checkpoint_asks_in_a_terminal(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    monkeypatch.setattr("dermcam.cli.ckpt._interactive", lambda: True)
    declined = invoke(runner, "restore", "aaa111:0", input="n\n")
    assert declined.exit_code == 0 and "aaa111:1, aaa111:2" in declined.stderr and "Nothing changed" in declined.stderr
    assert read_run(run)["resume_from"] is None
    assert invoke(runner, "restore", "aaa111:0", input="y\n").exit_code == 0
    assert read_run(run)["resume_from"] == "aaa111:0"


# ------------------------------------------------------------------------------------------------ verify


def test_verify_reports_damage_and_cleans_leftovers(runner) -> None:
    run = make_run("aaa111", [0.5, 0.9, 0.6])
    ok = invoke(runner, "verify")
    assert ok.exit_code == 0 and "3 intact" in ok.stdout

    # damage: one byte of epoch 1's weights flipped
    weights = run / "epoch-0001.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    # leftovers: an interrupted prune (sidecar gone first), an interrupted write's temporary
    (run / "epoch-0002.json").unlink()
    tmp = run / ".epoch-0003.safetensors.x1y2.tmp"
    tmp.write_bytes(b"partial")
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    fresh_tmp = run / ".run.json.a1b2.tmp"  # maybe a write in progress: never removed
    fresh_tmp.write_bytes(b"{")

    result = invoke(runner, "verify", "--json")
    assert result.exit_code == 4
    report = json.loads(result.stdout)
    assert report["ok"] == ["aaa111:0"]
    assert len(report["damaged"]) == 1 and "epoch-0001.safetensors does not match" in report["damaged"][0]["problem"]
    leftovers = {Path(e["path"]).name for e in report["incomplete"]}
    assert leftovers == {"epoch-0002.safetensors", "epoch-0002.state.safetensors", tmp.name, fresh_tmp.name}

    human = invoke(runner, "verify")
    assert human.exit_code == 4 and "damaged" in human.stdout and "verify --clean" in human.stdout

    cleaned = invoke(runner, "verify", "--clean", "--json")
    assert cleaned.exit_code == 4  # the damaged checkpoint is still reported, never deleted
    assert {Path(e["path"]).name for e in json.loads(cleaned.stdout)["incomplete"] if e["cleaned"]} == {
        "epoch-0002.safetensors", "epoch-0002.state.safetensors", tmp.name}
    assert weights.exists() and (run / "epoch-0001.json").exists() and fresh_tmp.exists()
    assert not tmp.exists() and not (run / "epoch-0002.safetensors").exists()
    assert epochs(run) == [0, 1]


@pytest.mark.parametrize("command", ["list", "prune", "export", "restore", "verify"])
def test_help_is_fast_and_does_not_import_torch(command: str) -> None:
    code = ("import sys\nfrom dermcam.cli import app\ntry:\n"
            f"    app(['ckpt', {command!r}, '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().splitlines()[-1] == "HEAVY=", out


def test_verify_clean_leaves_a_training_run_alone(runner) -> None:
    run = make_run("aaa111", [0.5, 0.9])
    (run / "epoch-0001.json").unlink()  # looks like an interrupted write
    with store_lock("run-aaa111"):
        report = json.loads(invoke(runner, "verify", "--clean", "--json").stdout)
    assert {e["note"] for e in report["incomplete"]} == {"run is training; left alone"}
    assert not any(e["cleaned"] for e in report["incomplete"]) and (run / "epoch-0001.safetensors").exists()
