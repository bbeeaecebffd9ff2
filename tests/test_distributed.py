"""Multi-process training under torchrun: 2 CPU processes (gloo) against one process with the same global batch.

test_convnext has no BatchNorm, so per-rank batches give exactly the gradients of the whole batch and the
weights must agree up to floating-point reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_json, weights_of
from dermcam.errors import BadInputError
from dermcam.train.distributed import DistContext

TINY = ["--backbone", "test_convnext", "--pretrained", "none", "--image-size", "32", "--batch-size", "8",
        "--data", "synth", "--precision", "fp32"]


def torchrun(store: Path, args: list[str], nproc: int = 2) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node N -m -- dermcam ARGS`` against the store ``store``.

    The ``--`` stops torchrun's parser from reading ``--run`` as its own ``--run-path`` (prefix match).
    """
    env = {**os.environ, "DERMCAM_HOME": str(store), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "--", "dermcam", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL both ranks, then torchrun: a crash (torchrun starts each worker in a session of its own)."""
    workers = [int(pid) for f in Path(f"/proc/{proc.pid}/task").glob("*/children") for pid in f.read_text().split()]
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()


def resume_pointer(run_dir: Path) -> str | None:
    """The checkpoint a run resumes from, as its run.json says (written atomically: always whole)."""
    run_json_file = run_dir / "run.json"
    return json.loads(run_json_file.read_text()).get("resume_from") if run_json_file.is_file() else None


def torchrun_json(store: Path, args: list[str]) -> list[dict]:
    proc = torchrun(store, [*args, "--json"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)  # one document: ranks other than 0 print nothing


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_augmenting_a_slice_gives_that_slice_of_the_whole_batch() -> None:
    from dermcam.train.augment import apply_augment, augment, batch_generator, draw_augment

    x = torch.rand(8, 3, 36, 48)
    whole = augment(x, (32, 32), batch_generator(0, 3, 5))
    draw = draw_augment(8, 48 / 36, batch_generator(0, 3, 5))
    ranks = [DistContext(rank=r, world_size=4) for r in range(4)]
    parts = [apply_augment(x[ctx.shard(8)], (32, 32), draw[ctx.shard(8)]) for ctx in ranks]
    assert torch.equal(torch.cat(parts), whole)


def test_shards_cover_every_row_once() -> None:
    for n in (0, 1, 9, 10):
        for world in (1, 2, 3):
            rows = [i for r in range(world) for i in range(n)[DistContext(rank=r, world_size=world).shard(n)]]
            assert rows == list(range(n))


def test_multi_process_runs_need_a_divisible_batch_and_cuda_for_sync_bn() -> None:
    from dermcam.train.config import TrainConfig
    from dermcam.train.trainer import check_distributed

    two_on_cpu = DistContext(rank=1, world_size=2, device=torch.device("cpu"))
    with pytest.raises(BadInputError, match=r"--batch-size 7 is the global batch size .* processes \(2\)"):
        check_distributed(TrainConfig(batch_size=7), two_on_cpu)
    with pytest.raises(BadInputError, match="sync_bn needs CUDA"):
        check_distributed(TrainConfig(batch_size=8, sync_bn=True), two_on_cpu)
    check_distributed(TrainConfig(batch_size=8), two_on_cpu)
    check_distributed(TrainConfig(batch_size=7, sync_bn=True), DistContext())  # one process: nothing to check


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(runner, home: Path) -> None:
    args = ["train", *TINY, "--epochs", "2"]
    [single] = run_json(runner, [*args, "--json"])
    [multi] = torchrun_json(home, args)
    run_dir = Path(multi["run_dir"])
    assert run_dir.parent == home / "runs" and len(list((home / "runs").iterdir())) == 2
    for epoch in (0, 1):
        weights = weights_of(run_dir, epoch)
        assert not any(k.startswith("module.") for k in weights)
        assert_same_weights(weights, weights_of(Path(single["run_dir"]), epoch))
        sidecar = json.loads((run_dir / f"epoch-{epoch:04d}.json").read_text())
        assert sidecar["world_size"] == 2 and sidecar["config"]["batch_size"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (Path(single["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for got, want in zip(records, expected):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_n"] == want["val_n"] == 9  # every val image, predicted in shards of 5 and 4
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    assert multi["best_checkpoint"] == f"{multi['run_id']}:{single['best_checkpoint'].split(':')[1]}"
    assert multi["test_metrics"]["balanced_accuracy"] == pytest.approx(single["test_metrics"]["balanced_accuracy"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert (run_dir / "report" / "curves.png").is_file()


@pytest.mark.slow
def test_killed_multi_process_run_resumes_with_two_or_one_processes(runner, home: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", *TINY, "--epochs", "3", "--accumulate", "2"]
    [straight] = run_json(runner, [*args, "--json"])

    proc = torchrun(home, args)
    deadline = time.monotonic() + 240
    while not (saved := [run for run in (home / "runs").iterdir() if resume_pointer(run) == f"{run.name}:1"]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    kill_job(proc)  # right after epoch 1 became the run's resume point
    [killed] = saved
    assert not (killed / "epoch-0002.json").exists()

    other = tmp_path / "other-store"  # the same interrupted run, to resume it a second way
    shutil.copytree(home, other)
    [two] = torchrun_json(home, ["train", "--resume", "--run", killed.name])
    monkeypatch.setenv("DERMCAM_HOME", str(other))
    [one] = run_json(runner, ["train", "--resume", "--run", killed.name, "--json"])

    want = weights_of(Path(straight["run_dir"]), 2)
    for result in (two, one):
        assert result["resumed_from"] == f"{killed.name}:1" and result["epochs_done"] == 3
        assert_same_weights(weights_of(Path(result["run_dir"]), 2), want)
    assert json.loads((other / "runs" / killed.name / "epoch-0002.json").read_text())["world_size"] == 1
    assert json.loads((killed / "epoch-0002.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_indivisible_batch_fails_on_every_rank_without_hanging(home: Path) -> None:
    proc = torchrun(home, ["train", *TINY, "--batch-size", "7", "--epochs", "1"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "--batch-size 7 is the global batch size and must be divisible by the number of processes (2)" in err
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
