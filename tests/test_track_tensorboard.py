"""``dermcam train --log tensorboard[:DIR]`` (issue 26): event files read back with TensorBoard's own reader,
the same steps across a resume, the tracked run named in sidecars and ``ckpt list --json``, a tracker that
fails reported once while training goes on, and ``evaluate`` logging to the run it belongs to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_train import stop_after_epoch

from conftest import run_json
from dermcam.cli import app

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'dermcam[tensorboard]') is not installed")

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]


def read_events(folder: Path) -> object:
    """TensorBoard's own reader over a run's event files (it applies purges, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def raw_steps(folder: Path, tag: str) -> list[int]:
    """Every step written for ``tag`` in every event file, duplicates included (what a naive reader sees)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_a_run_is_written_as_tensorboard_scalars_images_and_text(runner, home: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--epochs", "2", "--log", "tensorboard", "--json"])
    run_dir = Path(result["run_dir"])
    acc = read_events(run_dir / "tensorboard")
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "val/balanced_accuracy", "val/macro_f1", "val/loss",
                "time/epoch_seconds", "time/images_per_second"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 1], tag
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for event, record in zip(acc.Scalars("val/balanced_accuracy"), records):
        assert event.value == pytest.approx(record["val_balanced_accuracy"], rel=1e-6)
    best_epoch = int(result["best_checkpoint"].rpartition(":")[2])
    [test] = acc.Scalars("test/balanced_accuracy")
    assert test.step == best_epoch and test.value == pytest.approx(result["test_metrics"]["balanced_accuracy"])
    assert "test/auc_macro" in scalars
    images = acc.Tags()["images"]
    assert {"report/confusion_matrix", "report/curves", "report/roc"} <= set(images)
    texts = acc.Tags()["tensors"]  # add_text is stored as a text tensor
    assert "config/text_summary" in texts
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "test_efficientnet" in config and "| epochs |" in config
    # the run names where it is tracked: every sidecar, run.json and ckpt list --json
    tracking = [{"kind": "tensorboard", "dir": "tensorboard"}]
    for epoch in (0, 1):
        assert json.loads((run_dir / f"epoch-{epoch:04d}.json").read_text())["tracking"] == tracking
    assert json.loads((run_dir / "run.json").read_text())["tracking"] == tracking
    rows = run_json(runner, ["ckpt", "list", "--json"])
    assert all(row["tracking"] == tracking for row in rows)


def test_resume_writes_on_in_the_same_folder_without_repeating_a_step(runner, home: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    board = tmp_path / "board"
    restore = stop_after_epoch(monkeypatch, epoch=1)
    interrupted = runner.invoke(app, ["train", *TINY, "--epochs", "3", "--patience", "9", "--log", f"tensorboard:{board}"])
    assert interrupted.exit_code == 130, interrupted.output
    restore()
    [run_dir] = (home / "runs").iterdir()
    folder = board / run_dir.name  # DIR/<run id>
    # stopped right after epoch 1's checkpoint, before its tracker call: the window a resume must close
    assert [e.step for e in read_events(folder).Scalars("train/loss")] == [0]
    [resumed] = run_json(runner, ["train", "--resume", "--json"])  # the run's own --log, no option given
    acc = read_events(folder)
    for tag in ("train/loss", "val/balanced_accuracy", "time/images_per_second"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2], tag
        assert raw_steps(folder, tag) == [0, 1, 2], tag  # not hidden by a purge: never written twice
    assert len(list(folder.glob("events.out.tfevents.*"))) >= 2  # the resume wrote its own file beside
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in records])
    sidecar = json.loads((run_dir / "epoch-0002.json").read_text())
    assert sidecar["tracking"] == [{"kind": "tensorboard", "dir": str(folder)}]
    assert resumed["config"]["log"] == [f"tensorboard:{board}"]


def test_a_rollback_purges_the_stale_later_steps(runner, home: Path, tmp_path: Path) -> None:
    """After ``ckpt restore RUN:0`` the resumed run trains epoch 1 again: TensorBoard shows the new one."""
    [first] = run_json(runner, ["train", *TINY, "--epochs", "2", "--patience", "9", "--log", "tensorboard", "--json"])
    run_id = first["run_id"]
    folder = Path(first["run_dir"]) / "tensorboard"
    assert runner.invoke(app, ["ckpt", "restore", f"{run_id}:0"]).exit_code == 0
    run_json(runner, ["train", "--resume", "--run", run_id, "--json"])
    acc = read_events(folder)
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    record = [json.loads(line) for line in (Path(first["run_dir"]) / "metrics.jsonl").read_text().splitlines()][-1]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(record["train_loss"])


def test_a_tensorboard_folder_that_cannot_be_written_stops_logging_once_and_training_goes_on(runner, home: Path,
                                                                                              tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["train", *TINY, "--epochs", "2", "--log", f"tensorboard:{blocker}", "--json"])
    assert result.exit_code == 0, result.output
    assert result.output.count("TensorBoard logging stopped") == 1
    [summary] = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert (run_dir / "report" / "report.html").is_file() and (run_dir / "epoch-0001.json").is_file()


def test_evaluate_logs_its_result_to_the_tracked_run(runner, home: Path, tmp_path: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--epochs", "1", "--log", "tensorboard", "--json"])
    evaluated = run_json(runner, ["evaluate", result["run_id"], "--split", "val", "--resamples", "0",
                                  "--out", str(tmp_path / "eval"), "--json"])
    acc = read_events(Path(result["run_dir"]) / "tensorboard")
    [event] = acc.Scalars("evaluate/synth/val/balanced_accuracy")
    assert event.step == 0 and event.value == pytest.approx(evaluated["metrics"]["balanced_accuracy"])
    assert "evaluate/synth/val/confusion_matrix" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("train/loss")] == [0]  # the run's own curves untouched
