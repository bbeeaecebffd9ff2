"""``dermcam train --log mlflow[:URI]`` (issue 26) against a real MLflow server started here on 127.0.0.1
(one per module) and against a file store: parameters, metrics by step, tags and artefacts read back with
MLflow's own client; resume continues the same MLflow run; several configurations and the folds of a
cross-validation are nested runs under one parent; evaluate, calibrate and ensemble create log to the run
they belong to; a password in the URI appears nowhere; a server that refuses, hangs or dies mid-run costs
one warning and never the run.

The last test kills the module's server; it stays last in this file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_json
from dermcam.cli import app

pytest.importorskip("mlflow", reason="the mlflow extra (pip install 'dermcam[mlflow]') is not installed")

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]
SERVER_START_S = 300  # a cold sqlite store runs its migrations first (25 s on a busy 2-core machine)
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{base / 'db.sqlite'}", "--artifacts-destination",
               str(base / "artifacts"), "--workers", "1"]
        with open(self.log, "wb") as log:  # its own session: killed with every worker it started
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **QUIET}, cwd=base)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"mlflow server did not answer within {SERVER_START_S} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield running
    running.kill()


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_identity(sidecar_or_row: dict) -> dict:
    [identity] = [t for t in sidecar_or_row["tracking"] if t["kind"] == "mlflow"]
    return identity


def steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def artefacts(c, run_id: str, path: str) -> set[str]:
    return {Path(f.path).name for f in c.list_artifacts(run_id, path)}


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_run_is_logged_with_params_metrics_tags_and_artefacts_and_no_password(runner, home: Path, server,
                                                                                tmp_path: Path) -> None:
    secret = "s3cret-pw"
    uri = server.url.replace("http://", f"http://alice:{secret}@")
    result = runner.invoke(app, ["train", *TINY, "--epochs", "2", "--log", f"mlflow:{uri}", "--log-model", "--json"])
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.stdout)  # no MLflow run link on stdout
    run_dir = Path(summary["run_dir"])
    sidecar = json.loads((run_dir / "epoch-0001.json").read_text())
    identity = mlflow_identity(sidecar)
    assert identity["uri"] == server.url.replace("http://", "http://alice:***@")
    c = client(server.url)
    run = c.get_run(identity["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == identity["experiment_id"]
    params = run.data.params
    assert params["backbone"] == "test_efficientnet" and params["epochs"] == "2" and params["lr"] == "0.0003"
    assert secret not in json.dumps(params)
    tags = run.data.tags
    assert tags["dermcam.run_id"] == summary["run_id"] and tags["dermcam.dataset"] == "synth"
    assert tags["dermcam.dataset_fingerprint"] == sidecar["dataset"]["fingerprint"]
    assert tags["dermcam.backbone"] == "test_efficientnet" and tags["dermcam.version"]
    assert tags["dermcam.best_checkpoint"] == summary["best_checkpoint"]
    assert tags["dermcam.last_checkpoint"] == f"{summary['run_id']}:1"
    for key in ("train_loss", "lr", "val_balanced_accuracy", "val_macro_f1", "epoch_seconds", "images_per_second"):
        assert steps(c, identity["run_id"], key) == [0, 1], key
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = sorted(c.get_metric_history(identity["run_id"], "val_balanced_accuracy"), key=lambda m: m.step)
    assert [m.value for m in logged] == pytest.approx([r["val_balanced_accuracy"] for r in records])
    best_epoch = int(summary["best_checkpoint"].rpartition(":")[2])
    [test] = c.get_metric_history(identity["run_id"], "test_balanced_accuracy")
    assert test.step == best_epoch and test.value == pytest.approx(summary["test_metrics"]["balanced_accuracy"])
    assert {"report.html", "confusion_matrix.png", "curves.png", "metrics.json"} <= artefacts(c, identity["run_id"], "report")
    assert artefacts(c, identity["run_id"], "checkpoint") == {f"epoch-{best_epoch:04d}.json"}
    [model] = artefacts(c, identity["run_id"], "model")  # --log-model: the export, as ckpt export writes it
    assert model.startswith("dermcam-test_efficientnet-") and model.endswith(".safetensors")
    # either side finds the other: the sidecar names the MLflow run, the MLflow run names the dermcam run
    [row] = [r for r in run_json(runner, ["ckpt", "list", "--json"]) if r["id"] == summary["best_checkpoint"]]
    assert mlflow_identity(row)["run_id"] == identity["run_id"]
    # no secret in the store, the output or the report
    assert files_holding(home, secret) == []
    assert secret not in result.output and f"alice:{secret}" not in json.dumps(summary)

    # later commands log to the run the checkpoint belongs to
    evaluated = run_json(runner, ["evaluate", summary["best_checkpoint"], "--split", "val", "--resamples", "0",
                                  "--out", str(tmp_path / "eval"), "--json"])
    [value] = c.get_metric_history(identity["run_id"], "evaluate/synth/val/balanced_accuracy")
    assert value.step == best_epoch and value.value == pytest.approx(evaluated["metrics"]["balanced_accuracy"])
    assert "confusion_matrix.png" in artefacts(c, identity["run_id"], "evaluate/synth/val")
    calibrated = run_json(runner, ["calibrate", summary["best_checkpoint"], "--json"])
    [temperature] = c.get_metric_history(identity["run_id"], "calibrate/synth/calibration.temperature")
    assert temperature.value == pytest.approx(calibrated["calibration"]["temperature"])
    assert files_holding(home, secret) == []


def test_resume_continues_the_same_mlflow_run(runner, home: Path, server, monkeypatch) -> None:
    from helpers_train import stop_after_epoch

    restore = stop_after_epoch(monkeypatch, epoch=1)
    stopped = runner.invoke(app, ["train", *TINY, "--epochs", "3", "--patience", "9", "--log", f"mlflow:{server.url}"])
    assert stopped.exit_code == 130, stopped.output
    restore()
    [run_dir] = (home / "runs").iterdir()
    first = mlflow_identity(json.loads((run_dir / "run.json").read_text()))
    c = client(server.url)
    assert c.get_run(first["run_id"]).info.status == "KILLED"
    assert steps(c, first["run_id"], "train_loss") == [0]  # stopped before epoch 1 reached the tracker
    [resumed] = run_json(runner, ["train", "--resume", "--json"])
    again = mlflow_identity(json.loads((run_dir / "epoch-0002.json").read_text()))
    assert again["run_id"] == first["run_id"]
    assert c.get_run(first["run_id"]).info.status == "FINISHED"
    for key in ("train_loss", "val_balanced_accuracy"):
        assert steps(c, first["run_id"], key) == [0, 1, 2], key  # epoch 1 caught up, nothing twice
    assert resumed["best_checkpoint"] == c.get_run(first["run_id"]).data.tags["dermcam.best_checkpoint"]


def test_several_configurations_are_nested_runs_under_one_parent(runner, home: Path, server) -> None:
    results = run_json(runner, ["train", *TINY, "--epochs", "1", "--seed", "1", "--seed", "2",
                                "--log", f"mlflow:{server.url}", "--json"])
    c = client(server.url)
    runs = [c.get_run(mlflow_identity(json.loads((Path(r["run_dir"]) / "run.json").read_text()))["run_id"])
            for r in results]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    assert len(runs) == 2 and len(parents) == 1 and None not in parents
    parent = c.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["dermcam.kind"] == "comparison"
    assert {r.data.params["seed"] for r in runs} == {"1", "2"}
    # an ensemble of the two tells each member's run
    made = run_json(runner, ["ensemble", "create", "duo", *[r["best_checkpoint"] for r in results], "--json"])
    for run in runs:
        tags = c.get_run(run.info.run_id).data.tags
        assert tags["dermcam.ensemble.duo"] == ",".join(m["id"] for m in made["members"])
        [score] = c.get_metric_history(run.info.run_id, "ensemble/duo/val/balanced_accuracy")
        assert score.value == pytest.approx(made["val_metrics"]["balanced_accuracy"])


def test_the_folds_of_a_cross_validation_are_nested_under_one_parent(runner, home: Path, server) -> None:
    out = run_json(runner, ["train", *TINY, "--epochs", "1", "--folds", "2", "--ensemble", "cvt",
                            "--log", f"mlflow:{server.url}", "--json"])
    c = client(server.url)
    fold_runs = [c.get_run(mlflow_identity(json.loads((home / "runs" / r["run_id"] / "run.json").read_text()))["run_id"])
                 for r in out["runs"]]
    [parent_id] = {r.data.tags["mlflow.parentRunId"] for r in fold_runs}
    parent = c.get_run(parent_id)
    assert parent.data.tags["dermcam.cv"] == "cvt" and parent.data.tags["dermcam.ensemble"] == "ensemble:cvt"
    assert parent.data.metrics["oof_balanced_accuracy"] == pytest.approx(out["metrics"]["balanced_accuracy"])
    assert sorted(r.data.params["fold"] for r in fold_runs) == ["0", "1"]


def test_a_local_file_store_is_read_back_with_mlflow(runner, home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store in maintenance mode
    store = tmp_path / "mlruns"
    [summary] = run_json(runner, ["train", *TINY, "--epochs", "1", "--log", f"mlflow:{store}", "--json"])
    identity = mlflow_identity(json.loads((Path(summary["run_dir"]) / "run.json").read_text()))
    assert identity["uri"] == str(store)
    c = client(str(store))
    run = c.get_run(identity["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"
    assert steps(c, identity["run_id"], "val_balanced_accuracy") == [0]
    assert "report.html" in artefacts(c, identity["run_id"], "report")


def check_complete(summary: dict, epochs: int) -> None:
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert (run_dir / "report" / "report.html").is_file()
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        == list(range(epochs))
    assert all((run_dir / f"epoch-{e:04d}.json").is_file() for e in range(epochs))


def test_a_server_that_refuses_connections_costs_one_warning_and_never_the_run(runner, home: Path) -> None:
    uri = f"http://bob:hunter22@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = runner.invoke(app, ["train", *TINY, "--epochs", "2", "--log", f"mlflow:{uri}", "--json"])
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow logging stopped") == 1
    assert "hunter22" not in result.output and files_holding(home, "hunter22") == []
    check_complete(json.loads(result.stdout)[0], 2)
    assert time.monotonic() - started < 300


def test_a_server_that_never_answers_costs_one_timeout(runner, home: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the user's setting wins over dermcam's 10 s
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        started = time.monotonic()
        result = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--log", f"mlflow:http://127.0.0.1:{port}",
                                     "--json"])
        elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow logging stopped") == 1
    check_complete(json.loads(result.stdout)[0], 1)
    assert elapsed < 240


def test_a_server_killed_mid_run_costs_one_warning_and_the_store_is_complete(runner, home: Path, server,
                                                                              monkeypatch) -> None:
    """Kills the module's server after epoch 0 (the last test of this file)."""
    from dermcam.train import trainer

    original = trainer.Trainer._save

    def save_then_kill(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.epoch == 0:
            server.kill()
        return out

    monkeypatch.setattr(trainer.Trainer, "_save", save_then_kill)
    result = runner.invoke(app, ["train", *TINY, "--epochs", "3", "--patience", "9", "--log",
                                 f"mlflow:{server.url}", "--log", "tensorboard", "--json"])
    assert result.exit_code == 0, result.output
    assert result.output.count("MLflow logging stopped") == 1
    assert "TensorBoard logging stopped" not in result.output
    [summary] = json.loads(result.stdout)
    check_complete(summary, 3)
    sidecar = json.loads((Path(summary["run_dir"]) / "epoch-0002.json").read_text())
    assert mlflow_identity(sidecar)["run_id"]  # still named: a resume or evaluate can try it again
