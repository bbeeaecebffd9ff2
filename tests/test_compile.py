"""``--compile``: torch.compile when it works, the eager model and a one-line note when it does not,
never a stopped run (dermcam.models.compile and the trainer's first-step fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_json, weights_of
from dermcam.cli import app
from dermcam.models.compile import maybe_compile

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth", "--device", "cpu", "--precision", "fp32"]


def test_maybe_compile_off_unavailable_or_refused_keeps_the_module(monkeypatch) -> None:
    module = torch.nn.Linear(2, 2)
    assert maybe_compile(module, False) == (module, None)

    def refuses(_module, **_kwargs):
        raise RuntimeError("Dynamo is not supported on this Python\nlong traceback")

    monkeypatch.setattr(torch, "compile", refuses)
    same, note = maybe_compile(module, True)
    assert same is module
    assert note == "--compile failed, running eagerly: RuntimeError: Dynamo is not supported on this Python"
    monkeypatch.delattr(torch, "compile")
    same, note = maybe_compile(module, True)
    assert same is module and "has no torch.compile" in note and "\n" not in note


class CompilesLazilyThenFails(torch.nn.Module):
    """What torch.compile returns when its backend cannot compile the model: wrapping works, the first
    call fails, after running part of the model (BatchNorm statistics move) and drawing random numbers."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner(x)
        torch.rand(7)
        raise RuntimeError("backend='inductor' raised: CppCompileError: no C++ compiler (simulated)")


def test_a_compile_failure_at_the_first_step_falls_back_to_the_eager_run(runner, home: Path, monkeypatch) -> None:
    """The run finishes, says why it runs eagerly, and learns exactly what a run without --compile learns."""
    [plain] = run_json(runner, ["train", *TINY, "--epochs", "2", "--json"])
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: CompilesLazilyThenFails(module))
    result = runner.invoke(app, ["train", *TINY, "--epochs", "2", "--compile", "--json"])
    assert result.exit_code == 0, result.output
    [fallback] = json.loads(result.stdout)
    log = " ".join(result.stderr.split())  # the console wraps long lines
    assert "--compile failed, running eagerly: RuntimeError: backend='inductor' raised" in log
    assert log.count("--compile failed") == 1  # noticed once, at the first step, not every epoch
    assert fallback["config"]["compile"] is True
    for epoch in (0, 1):
        sidecar = json.loads((Path(fallback["run_dir"]) / f"epoch-{epoch:04d}.json").read_text())
        assert sidecar["compiled"] is False and "CppCompileError" in sidecar["compile_note"]
        a, b = weights_of(Path(plain["run_dir"]), epoch), weights_of(Path(fallback["run_dir"]), epoch)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fallback["test_metrics"] == plain["test_metrics"]


def test_compile_may_be_switched_on_resume() -> None:
    """Like --device, --compile says how a run executes, not what it computes (see Trainer._open_run)."""
    from dermcam.train.trainer import RESUME_OPTIONS

    assert "compile" in RESUME_OPTIONS


@pytest.mark.slow
def test_a_tiny_run_with_real_torch_compile_works_or_falls_back_with_a_note(runner, home: Path) -> None:
    result = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--compile", "--json"])
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)
    sidecar = json.loads((Path(run["run_dir"]) / "epoch-0000.json").read_text())
    if sidecar["compiled"]:
        assert sidecar["compile_note"] is None
    else:
        assert sidecar["compile_note"].startswith("--compile ") and "--compile" in result.stderr
    assert 0.0 <= run["test_metrics"]["balanced_accuracy"] <= 1.0


def test_evaluate_compile_falls_back_to_eager_with_a_warning_and_the_same_answer(runner, home: Path,
                                                                                 monkeypatch) -> None:
    """`evaluate --compile` where compiling fails mid-run: the same metrics as without it, one warning."""
    run_json(runner, ["train", *TINY, "--epochs", "1", "--json"])
    plain = run_json(runner, ["evaluate", "--resamples", "0", "--json"])
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: CompilesLazilyThenFails(module))
    result = runner.invoke(app, ["evaluate", "--resamples", "0", "--compile", "--json"])
    assert result.exit_code == 0, result.output
    fallback = json.loads(result.stdout)
    assert fallback["metrics"] == plain["metrics"]
    assert any("--compile failed, running eagerly" in w for w in fallback["warnings"])
    assert "--compile failed" in " ".join(result.stderr.split())
