"""``--log`` / ``--log-model`` values (issue 26): parsed and checked before any work, secrets masked, a missing
extra named in one line, the tracking identity validated where the store reads it, and ``--help`` never
importing a tracker. Fast: no training here (tests/test_track_tensorboard.py and test_track_mlflow.py train)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermcam.cli import app
from dermcam.errors import BadInputError, CorruptError
from dermcam.track import spec as track_spec
from dermcam.track.spec import LogSpec, check_log, mask_uri, parse_log, parse_logs, reveal, scrub, without_userinfo

TINY = ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "48", "--batch-size", "16",
        "--data", "synth"]


def test_values_parse_to_a_kind_and_a_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_log("tensorboard") == LogSpec("tensorboard")
    assert parse_log("TensorBoard:board") == LogSpec("tensorboard", str(tmp_path / "board"))  # absolute
    assert parse_log("mlflow") == LogSpec("mlflow")
    assert parse_log("mlflow:http://127.0.0.1:5000") == LogSpec("mlflow", "http://127.0.0.1:5000")
    assert parse_log("mlflow:sqlite:///x/db.sqlite").target == "sqlite:///x/db.sqlite"
    assert parse_log("mlflow:mlruns").target == str(tmp_path / "mlruns")  # a local file store
    assert parse_log("mlflow:databricks").target == "databricks"


@pytest.mark.parametrize("value, words", [
    ("wandb", "tensorboard[:DIR] or mlflow[:TRACKING_URI]"),
    ("mlflow:", "nothing after ':'"),
    ("tensorboard:http://host/x", "give a folder"),
    ("mlflow:http:///nohost", "names no host"),
    ("tensorboard:a\nb", "control character"),
])
def test_bad_values_are_one_line_errors(value: str, words: str) -> None:
    with pytest.raises(BadInputError, match=None) as caught:
        parse_log(value)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_same_tracker_twice_and_wrong_types_are_refused() -> None:
    with pytest.raises(BadInputError, match="given twice"):
        parse_logs(["mlflow:http://h:1", "mlflow:http://h:1"])
    with pytest.raises(BadInputError, match="list"):
        parse_logs("tensorboard")
    with pytest.raises(BadInputError, match="must be text"):
        parse_logs([3])
    assert [s.kind for s in parse_logs(["tensorboard", "mlflow"])] == ["tensorboard", "mlflow"]


def test_uris_are_masked_and_the_real_value_stays_in_this_process() -> None:
    uri = "https://alice:pa%40ss@mlflow.example.org:8443/x?token=abc&run=1"
    assert mask_uri(uri) == "https://alice:***@mlflow.example.org:8443/x?token=***&run=1"
    assert mask_uri("https://TOKEN123@host/") == "https://***@host/"
    assert mask_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mask_uri("/plain/path") == "/plain/path"
    assert mask_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"  # kept exactly (four slashes)
    assert mask_uri("postgresql://u:pw@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert without_userinfo("postgresql://u:pw@db/mlflow")[0] == "postgresql://u:pw@db/mlflow"  # its driver reads it
    spec = parse_log(f"mlflow:{uri}")
    assert spec.shown == "mlflow:https://alice:***@mlflow.example.org:8443/x?token=***&run=1"
    assert reveal(spec.shown_target) == uri  # the runs of this command still reach the server
    assert "pa@ss" not in scrub(f"failed: {uri} (pa@ss)") and uri not in scrub(f"failed: {uri}")
    assert without_userinfo(uri) == ("https://mlflow.example.org:8443/x?token=abc&run=1", "alice", "pa@ss")
    assert without_userinfo("https://alice:***@host/") == ("https://host/", "alice", None)  # env gives it
    assert without_userinfo("https://TOKEN@host/") == ("https://host/", None, "TOKEN")


def test_a_missing_extra_is_named_and_log_model_needs_mlflow(monkeypatch) -> None:
    real = track_spec.importlib.util.find_spec
    monkeypatch.setattr(track_spec.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "tensorboard") else real(name, *a))
    with pytest.raises(BadInputError, match=r"pip install 'dermcam\[mlflow\]'"):
        check_log(["mlflow"])
    with pytest.raises(BadInputError, match=r"pip install 'dermcam\[tensorboard\]'"):
        check_log(["tensorboard"])
    monkeypatch.setattr(track_spec.importlib.util, "find_spec", real)
    with pytest.raises(BadInputError, match="--log-model .* needs --log mlflow"):
        check_log([], True)


@pytest.mark.parametrize("extra, words", [
    (["--log", "wandb"], "the tracker must be"),
    (["--log", "mlflow:"], "nothing after ':'"),
    (["--log-model"], "--log-model"),
    (["--log", "tensorboard", "--log", "tensorboard"], "given twice"),
])
def test_train_refuses_bad_log_options_before_any_run_exists(runner, home: Path, extra: list[str], words: str) -> None:
    result = runner.invoke(app, ["train", *TINY, "--epochs", "1", *extra])
    assert result.exit_code == 2, result.output
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_train_without_the_extra_says_which_to_install(runner, home: Path, monkeypatch) -> None:
    real = track_spec.importlib.util.find_spec
    monkeypatch.setattr(track_spec.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = runner.invoke(app, ["train", *TINY, "--log", "mlflow:http://127.0.0.1:5000"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --log mlflow needs MLflow: pip install 'dermcam[mlflow]'"


def test_a_toml_file_can_give_log_and_a_bad_one_is_refused(runner, home: Path, tmp_path: Path) -> None:
    config = tmp_path / "runs.toml"
    config.write_text('backbone = "test_efficientnet"\npretrained = "none"\ndataset = "synth"\n'
                      'log = "tensorboard"\n[[run]]\n')
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "'log' must be list" in result.output


def test_help_imports_no_tracker() -> None:
    code = ("import sys; from typer.testing import CliRunner; from dermcam.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--log-model' in r.output; "
            "print([m for m in ('mlflow', 'tensorboard', 'dermcam.track.base') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_store_validates_a_tracking_identity() -> None:
    from dermcam.store import schema as s

    good = [{"kind": "tensorboard", "dir": "tensorboard"}, {"kind": "tensorboard", "dir": "/abs/board/3fa9c1"},
            {"kind": "mlflow", "uri": "http://alice:***@h:5000", "experiment_id": "1", "run_id": "a1b2c3",
             "parent_run_id": None}]
    s.validate(good, s.TRACKING, "sidecar")
    for bad in ([{"kind": "wandb"}], [{"kind": "tensorboard", "dir": "../../elsewhere"}],
                [{"kind": "mlflow", "run_id": "../x"}], [{"kind": "mlflow", "uri": "a\nb"}], {"kind": "mlflow"}):
        with pytest.raises(CorruptError, match="damaged or modified"):
            s.validate(bad, s.TRACKING, "sidecar")


def test_a_damaged_tracking_field_makes_the_run_json_damaged(runner, home: Path) -> None:
    from dermcam.store.runs import create_run, read_run, update_run

    run_dir = create_run({"dataset": "synth"}, home, "abc123")
    update_run(run_dir, tracking=[{"kind": "mlflow", "uri": "http://h:1", "run_id": "r1", "experiment_id": "0"}])
    assert read_run(run_dir)["tracking"][0]["run_id"] == "r1"
    data = json.loads((run_dir / "run.json").read_text())
    data["tracking"] = [{"kind": "mlflow", "run_id": "a b"}]
    (run_dir / "run.json").write_text(json.dumps(data))
    with pytest.raises(CorruptError, match="tracking"):
        read_run(run_dir)
