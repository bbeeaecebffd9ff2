"""`dermcam demo` end to end through the CLI, with a tiny model so it runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dermcam.cli import app


@pytest.fixture
def tiny_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real demo pipeline, but a tiny random-weight model, one epoch and a small synthetic set."""
    from dermcam import demo
    from dermcam.data import synthetic

    # the demo's own input size (not a smaller one): a size that disagrees with its cache shows up here
    monkeypatch.setattr(demo, "DEMO_TRAIN", {"backbone": "test_efficientnet", "pretrained": "none", "epochs": 1,
                                             "image_size": demo.DEMO_TRAIN["image_size"], "batch_size": 16})
    original = synthetic.write_synthetic_ham10000
    monkeypatch.setattr(demo, "write_synthetic_ham10000",
                        lambda dest: original(dest, n_lesions_per_class=8, images_per_lesion=(1, 2)))


def test_demo_runs_every_step_in_its_own_store(runner, tiny_demo, tmp_path: Path, dermcam_home: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for command in ("dermcam data synthetic", "dermcam prepare", "dermcam train", "dermcam ckpt list",
                    "dermcam explain"):
        assert f"$ {command}" in result.stdout
    assert "Best checkpoint" in result.stdout and "dermcam prepare ./ham10000" in result.stdout
    # a newcomer gets no warning or note about the demo's own settings, which they cannot act on
    printed = (result.stdout + result.stderr).splitlines()
    assert not [line for line in printed if line.lstrip().startswith(("Warning", "Note"))], result.output
    store = out / "store"
    assert (store / "datasets" / "demo" / "manifest.json").is_file()
    [run] = [p for p in (store / "runs").iterdir()]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    overlays = sorted((out / "explain").glob("*.cam.png"))
    assert overlays and all(p.with_name(p.name.replace(".cam.png", ".json")).is_file() for p in overlays)
    assert not any(dermcam_home.iterdir()), "the demo must not touch the user's store"

    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "Synthetic data already in" in again.stdout and "Reusing the finished demo run" in again.stdout
    assert [p.name for p in (store / "runs").iterdir()] == [run.name]
