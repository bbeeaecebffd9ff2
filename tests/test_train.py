"""`dermcam train` / `dermcam evaluate` through the CLI on a tiny synthetic data set and tiny timm models."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_train import stop_after_epoch

from conftest import run_json, weights_of
from dermcam.cli import app

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]


def test_train_writes_checkpoints_metrics_and_report(runner, home: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--epochs", "2", "--json"])
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == home / "runs"
    for epoch in (0, 1):
        sidecar = json.loads((run_dir / f"epoch-{epoch:04d}.json").read_text())
        assert sidecar["schema"] == "dermcam.checkpoint/1"
        assert sidecar["id"] == f"{result['run_id']}:{epoch}"
        assert sidecar["classes"] == ["bkl", "mel", "nv"]
        assert sidecar["label_encoding"] == {"bkl": 0, "mel": 1, "nv": 2}
        assert sidecar["preprocessing"]["input_size"] == [3, 48, 48]
        assert sidecar["preprocessing"]["color_constancy"] == "none"  # written out, not left to the reader
        assert sidecar["dataset"]["name"] == "synth" and sidecar["dataset"]["fingerprint"]
        assert set(sidecar["versions"]) == {"dermcam", "torch", "timm"}
        assert sidecar["config"]["backbone"] == "test_efficientnet"
        for key in ("balanced_accuracy", "macro_f1", "recall_mel", "auc_macro", "loss"):
            assert key in sidecar["metrics"]
        from dermcam.store.files import sha256_file

        assert sha256_file(run_dir / sidecar["weights"]["file"]) == sidecar["weights"]["sha256"]
        assert (run_dir / sidecar["state"]["file"]).is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    for name in ("metrics.json", "confusion_matrix.png", "curves.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
    test = result["test_metrics"]
    assert 0.0 <= test["balanced_accuracy"] <= 1.0
    assert np.asarray(test["confusion_matrix"]).sum() == test["n"] > 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_non_square_input_keeps_the_aspect_ratio(runner, home: Path, tmp_path: Path) -> None:
    args = [a for a in TINY if a not in ("--image-size", "48")]
    [result] = run_json(runner, ["train", *args, "--image-size", "64x48", "--epochs", "1", "--json"])
    sidecar = json.loads((Path(result["run_dir"]) / "epoch-0000.json").read_text())
    assert sidecar["preprocessing"]["input_size"] == [3, 48, 64]
    image = next((home / "datasets").rglob("images.npy"))
    from PIL import Image

    frame = Image.fromarray(np.load(image, mmap_mode="r")[0].copy())
    frame.save(tmp_path / "lesion.png")
    explained = runner.invoke(app, ["explain", str(tmp_path / "lesion.png"), "-o", str(tmp_path / "out"), "--json"])
    assert explained.exit_code == 0, explained.output
    assert (tmp_path / "out" / "lesion.cam.png").is_file()
    bad = runner.invoke(app, ["train", *args, "--image-size", "64by48"])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output


@pytest.mark.parametrize("extra", [[], ["--ema", "--ema-decay", "0.9", "--accumulate", "2", "--balance", "sampler", "--freeze", "1"]],
                         ids=["plain", "ema-accumulate-sampler-freeze"])
def test_resume_after_interruption_matches_straight_run(runner, home: Path, monkeypatch, extra: list[str]) -> None:
    args = ["train", *TINY, *extra, "--epochs", "3", "--json"]
    [straight] = run_json(runner, args)

    resume_normally = stop_after_epoch(monkeypatch)
    interrupted = runner.invoke(app, args)
    assert interrupted.exit_code == 130
    resume_normally()
    run_id = next(p.name for p in (home / "runs").iterdir() if p.name != straight["run_id"])
    [resumed] = run_json(runner, ["train", "--resume", "--run", run_id, "--json"])
    assert resumed["resumed_from"] == f"{run_id}:1"
    a = weights_of(Path(straight["run_dir"]), 2)
    b = weights_of(Path(resumed["run_dir"]), 2)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed["test_metrics"] == straight["test_metrics"]


def test_freeze_keeps_the_stem_and_early_stages_fixed(runner, home: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--freeze", "2", "--epochs", "2", "--json"])
    first, last = (weights_of(Path(result["run_dir"]), epoch) for epoch in (0, 1))
    learned = [k for k in first if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    frozen = [k for k in learned if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert frozen and len(frozen) < len(learned)
    for key in learned:
        assert np.array_equal(first[key], last[key]) == (key in frozen), key


def test_ema_decay_warms_up_so_the_untrained_start_fades_quickly() -> None:
    import torch

    from dermcam.train.ema import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.998)
    torch.nn.init.ones_(model.weight)
    ema.update(model, step=0)  # decay min(0.998, 1/10): mostly the new weights
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 0.9))
    ema.update(model, step=10**6)  # late in training: the configured decay
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 0.9 * 0.998 + 0.002))


def test_resume_of_finished_run_does_nothing_more(runner, home: Path) -> None:
    [first] = run_json(runner, ["train", *TINY, "--epochs", "1", "--json"])
    [again] = run_json(runner, ["train", "--resume", "--json"])
    assert again["run_id"] == first["run_id"]
    assert again["epochs_done"] == 1
    assert not (Path(first["run_dir"]) / "epoch-0001.json").exists()


@pytest.mark.slow
def test_sigkill_during_training_never_breaks_the_store(home: Path, tmp_path: Path) -> None:
    """Kill a real training process at random moments, repeatedly; the store stays readable and resumable."""
    from dermcam.store.files import sha256_file
    from dermcam.store.runs import list_checkpoints, list_runs

    env = {**os.environ, "DERMCAM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dermcam", "train", *TINY, "--epochs", "6", "--patience", "99"]
    rng = np.random.default_rng(0)
    for attempt in range(4):
        argv = cmd if attempt == 0 else [sys.executable, "-m", "dermcam", "train", "--resume"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until this attempt has written at least one more checkpoint file, then kill at a random moment.
        before = len(list((home / "runs").rglob("epoch-*"))) if (home / "runs").exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (home / "runs").exists() and len(list((home / "runs").rglob("epoch-*"))) > before:
                break
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ckpt in list_checkpoints():
            assert sha256_file(ckpt.weights_path) == ckpt.sidecar["weights"]["sha256"]
            assert sha256_file(ckpt.state_path) == ckpt.sidecar["state"]["sha256"]
    final = subprocess.run([sys.executable, "-m", "dermcam", "train", "--resume", "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    [result] = json.loads(final.stdout)
    assert result["epochs_done"] == 6
    assert len(list_runs()) == 1
    assert [c.epoch for c in list_checkpoints()] == list(range(6))

    # The killed-and-resumed run ends with exactly the weights of a run that was never interrupted.
    straight_home = tmp_path / "straight"
    shutil.copytree(home / "datasets", straight_home / "datasets")
    straight = subprocess.run(cmd + ["--json"], env={**env, "DERMCAM_HOME": str(straight_home)},
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    [uninterrupted] = json.loads(straight.stdout)
    killed, clean = weights_of(Path(result["run_dir"]), 5), weights_of(Path(uninterrupted["run_dir"]), 5)
    assert killed.keys() == clean.keys()
    for key in clean:
        np.testing.assert_array_equal(killed[key], clean[key], err_msg=key)


def test_damaged_weights_are_detected(runner, home: Path) -> None:
    [result] = run_json(runner, ["train", *TINY, "--epochs", "1", "--json"])
    weights = Path(result["run_dir"]) / "epoch-0000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = runner.invoke(app, ["evaluate", result["best_checkpoint"]])
    assert out.exit_code == 4
    assert "sha256" in out.output and "Traceback" not in out.output


def test_checkpoint_without_valid_sidecar_is_ignored_and_resume_uses_the_previous(runner, home: Path) -> None:
    from dermcam.store.runs import list_checkpoints, resume_point

    [result] = run_json(runner, ["train", *TINY, "--epochs", "2", "--json"])
    run_dir = Path(result["run_dir"])
    (run_dir / "epoch-0001.json").write_text("{ truncated")
    assert [c.epoch for c in list_checkpoints()] == [0]
    assert resume_point(run_dir).epoch == 0


def test_experiments_compare_runs_and_mark_the_best(runner, home: Path) -> None:
    results = run_json(runner, ["train", *TINY, "--epochs", "1", "--lr", "1e-3", "--lr", "3e-3", "--json"])
    assert len(results) == 2
    assert {r["config"]["lr"] for r in results} == {1e-3, 3e-3}
    assert sum(r["is_best"] for r in results) == 1
    table = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--seed", "1", "--seed", "2"],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    rows = [line.strip() for line in lines if re.match(r"\s*\*?\s*[0-9a-f]{6}\s", line)]
    ensemble_row = [line.strip() for line in lines if re.match(r"\s*\*?\s*ensemble\s", line)]
    marked = [row for row in rows + ensemble_row if row.startswith("*")]
    header = next(line for line in lines if "best val" in line)
    assert "seed" in header and "lr" not in header.split()  # only what differs gets a column
    assert "Every run: backbone test_efficientnet" in table.stdout
    best = re.search(r"Best run: ([0-9a-f]{6}):", table.stdout)
    assert len(rows) == 2 and len(ensemble_row) == 1 and len(marked) == 1 and best, table.stdout
    # the marked row is the run named best, or the runs' ensemble when it beats that run on validation
    assert best.group(1) in marked[0] or marked[0] == ensemble_row[0]


def test_experiments_from_toml(runner, home: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('epochs = 1\nbackbone = "test_efficientnet"\npretrained = "none"\nimage_size = 48\n'
                      'batch_size = 16\ndataset = "synth"\n[[run]]\nlr = 1e-3\n[[run]]\nlr = 2e-3\nlabel_smoothing = 0.0\n')
    results = run_json(runner, ["train", "--config", str(config), "--json"])
    assert [r["config"]["lr"] for r in results] == [1e-3, 2e-3]
    assert results[1]["config"]["label_smoothing"] == 0.0


def test_evaluate_writes_report(runner, home: Path, tmp_path: Path) -> None:
    run_json(runner, ["train", *TINY, "--epochs", "1", "--json"])
    out = run_json(runner, ["evaluate", "--split", "val", "--tta", "--out", str(tmp_path / "rep"), "--json"])
    assert out["split"] == "val" and out["metrics"]["tta"] is True
    assert (tmp_path / "rep" / "confusion_matrix.png").is_file()
    human = runner.invoke(app, ["evaluate"])
    assert human.exit_code == 0 and "balanced accuracy" in human.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["train", "--data", "nope", "--pretrained", "none"], 3, "nope"),
        (["train", *TINY, "--balance", "weird"], 2, "--balance"),
        (["train", *TINY, "--epochs", "0"], 2, "--epochs"),
        (["train", *TINY, "--freeze", "9"], 2, "--freeze 9"),
        (["train", "--resume"], 3, "no resumable training runs"),
        (["evaluate"], 3, "no checkpoints"),
        (["train", "--config", "missing.toml"], 2, "missing.toml"),
    ],
)
def test_bad_input_gives_one_line_error(runner, home: Path, args: list[str], code: int, words: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert words in result.output
    assert "Traceback" not in result.output


def test_metrics_do_not_reward_always_nv() -> None:
    from dermcam.evaluate.metrics import compute_metrics

    y = np.array([0] * 10 + [1] * 10 + [2] * 80)
    always_nv = np.tile([0.0, 0.0, 1.0], (100, 1))
    m = compute_metrics(y, always_nv, ["bkl", "mel", "nv"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["recall_mel"] == 0.0
    assert m["auc_mel"] == pytest.approx(0.5)


def test_lr_schedule_warms_up_then_decays() -> None:
    from dermcam.train.schedule import lr_multiplier

    values = [lr_multiplier(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] < 0.05


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--weight-decay", "nan"], "--weight-decay"),
        (["--head-lr-scale", "nan"], "--head-lr-scale"), (["--head-lr-scale", "-1"], "--head-lr-scale"),
        (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--warmup-epochs", "inf"], "--warmup-epochs"),
        (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--patience", "-1"], "--patience"),
        (["--image-size", "100000x100000"], "--image-size"), (["--image-size", "48x"], "--image-size"),
        (["--monitor", "val_bogus"], "--monitor"), (["--monitor", "val_recall_bcc"], "names no class"),
        (["--seed", "-1"], "--seed"), (["--run", "abc"], "needs --resume"),
    ],
)
def test_bad_options_are_refused_before_any_run_exists(runner, home: Path, extra: list[str], words: str) -> None:
    result = runner.invoke(app, ["train", *TINY, "--epochs", "1", *extra])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


@pytest.mark.parametrize("line", ['epochs = "two"', "lr = true", 'image_size = [48, 36]', "seed = 1.5"])
def test_toml_values_of_the_wrong_type_are_refused(runner, home: Path, tmp_path: Path, line: str) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(f'backbone = "test_efficientnet"\npretrained = "none"\ndataset = "synth"\n{line}\n')
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "must be" in result.output and "Traceback" not in result.output
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_an_interrupted_run_says_so_and_resumes(runner, home: Path, monkeypatch) -> None:
    from dermcam.store.runs import latest_run, read_run
    from dermcam.train import trainer

    original = trainer.Trainer.train_one_epoch

    def interrupt_in_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "train_one_epoch", interrupt_in_second_epoch)
    result = runner.invoke(app, ["train", *TINY, "--epochs", "2"])
    assert result.exit_code == 130
    assert read_run(latest_run())["status"] == "interrupted"
    monkeypatch.setattr(trainer.Trainer, "train_one_epoch", original)
    resumed = runner.invoke(app, ["train", "--resume", "--lr", "0.5", "--device", "cpu", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert "ignored: --lr" in resumed.stderr
    assert read_run(latest_run())["status"] == "finished" and read_run(latest_run())["error"] is None


def test_an_image_size_above_the_cache_says_it_trains_on_upsampled_pixels(runner, home: Path) -> None:
    args = [a if a != "48" else "96x72" for a in TINY]  # the synthetic cache is 64x48
    result = runner.invoke(app, ["train", *args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "upsampled" in result.stderr.replace("\n", " ")


def test_a_diverging_run_stops_with_one_line_and_writes_no_nan_checkpoint(runner, home: Path) -> None:
    from dermcam.store.runs import latest_run, read_run

    result = runner.invoke(app, ["train", *TINY, "--epochs", "2", "--lr", "1e23"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "--lr" in errors[0], result.stderr
    run = read_run(latest_run())
    assert run["status"] == "failed" and "diverged" in run["error"]
    for weights in latest_run().glob("epoch-????.safetensors"):  # whatever was saved before is finite
        epoch = int(weights.stem.split("-")[1])
        assert all(np.isfinite(t).all() for t in weights_of(latest_run(), epoch).values())
