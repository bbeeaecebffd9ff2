"""``--threads N|auto`` for serve, explain, evaluate and train (issue 23, "Sharing the CPU"): one check,
one resolution rule, applied by the library before the first torch operation."""

from __future__ import annotations

import json
import os

import pytest

from dermcam.cli import app

COMMANDS = {  # each with a model or data set that does not exist: only --threads may answer first
    "explain": ["explain", "nosuch-image.jpg", "--checkpoint", "nosuch:3", "--out", "never-written"],
    "evaluate": ["evaluate", "nosuch:3", "--out", "never-written"],
    "train": ["train", "--data", "nosuch", "--epochs", "1"],
    "serve": ["serve", "nosuch:3", "--port", "0"],
}


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("value", ["0", "-1", "many", "100000", "1.5", ""])
def test_bad_threads_are_one_line_exit_2_before_any_work(runner, tmp_path, monkeypatch, command, value) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*COMMANDS[command], "--threads", value])
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: --threads "), lines
    assert value == "" or "must be auto or a whole number from 1 to" in lines[0]
    assert not (tmp_path / "never-written").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_good_threads_are_accepted_and_the_command_goes_on(runner, tmp_path, monkeypatch, command) -> None:
    """With a valid --threads the command gets past the check: what answers is the missing model or data."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    try:
        for value in ("1", "auto"):
            result = runner.invoke(app, [*COMMANDS[command], "--threads", value])
            assert result.exit_code in (2, 3), result.output
            assert "--threads" not in result.output
    finally:
        torch.set_num_threads(before)


def test_auto_resolves_to_the_idle_cores(monkeypatch) -> None:
    from dermcam.checks import cpu_count
    from dermcam.models.device import resolve_threads

    cores = cpu_count()
    assert 1 <= resolve_threads("auto") <= cores
    assert 1 <= resolve_threads(None) <= cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))  # every core busy: still one
    assert resolve_threads("auto") == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle: every core
    assert resolve_threads("auto") == cores
    monkeypatch.delattr(os, "getloadavg")  # Windows: no load average, every core
    assert resolve_threads("AUTO") == cores
    assert resolve_threads(" 3 ") == 3


def _tiny_checkpoint():
    import timm
    import torch

    from dermcam.store.checkpoint import save_checkpoint
    from dermcam.store.runs import create_run

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=2)
    sidecar = {"backbone": "test_efficientnet", "classes": ["nv", "mel"],
               "preprocessing": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3,
                                 "interpolation": "bicubic"},
               "metrics": {}, "monitor": {"name": "val_balanced_accuracy", "mode": "max", "value": 0.5}}
    return save_checkpoint(create_run({"backbone": "test_efficientnet"}), epoch=0, model_state=model.state_dict(),
                           sidecar=sidecar)


def test_explain_applies_threads_through_the_cli(runner, tmp_path, dermcam_home) -> None:
    import torch
    from PIL import Image

    ckpt = _tiny_checkpoint()
    image = tmp_path / "a.png"
    Image.new("RGB", (80, 60), (120, 80, 60)).save(image)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = runner.invoke(app, ["explain", str(image), "--checkpoint", ckpt.id, "--out", str(tmp_path / "o"),
                                     "--threads", "1", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_library_keeps_the_thread_count_unless_asked(tmp_path, dermcam_home, monkeypatch) -> None:
    """evaluate() and explain() called from Python (as the end of train, a cross-validation or a distillation
    call them) leave torch's thread count alone: later runs in that process must train with the count they
    started with, or a resumed run is no longer bit-identical. Only an explicit ``threads`` changes it."""
    import torch
    from PIL import Image

    from dermcam.evaluate.evaluation import evaluate
    from dermcam.explain.pipeline import explain

    ckpt = _tiny_checkpoint()
    image = tmp_path / "a.png"
    Image.new("RGB", (80, 60), (120, 80, 60)).save(image)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # "auto" would choose fewer threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        explain([image], checkpoint=ckpt.id, out_dir=tmp_path / "o")
        assert torch.get_num_threads() == 2
        explain([image], checkpoint=ckpt.id, out_dir=tmp_path / "o2", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert callable(evaluate) and evaluate.__kwdefaults__["threads"] is None


def test_help_shows_one_option_for_all_four(runner) -> None:
    for command in COMMANDS:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--threads" in result.output and "N|auto" in result.output, command
