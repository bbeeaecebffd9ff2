"""The GPU benchmark cannot run on this project's CPU machines, so its code is checked here on the CPU
(``--smoke``: tiny model, tiny images, eager): a session that gets a GPU for a few minutes must not
spend them on a bug in the script. Nothing is timed or compared here; benchmarks/ holds the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def run_smoke(script: str, results_file: str, cwd: Path, *extra: str) -> object:
    """Run ``benchmarks/<script> --smoke`` in ``cwd``: it must exit 0, leave ``cwd`` empty and leave its
    results file in benchmarks/results as it was. Returns the JSON of its last stdout line."""
    results = BENCH.parent / "results" / results_file
    before = results.read_bytes() if results.exists() else None
    proc = subprocess.run([sys.executable, str(BENCH.parent / script), "--smoke", *extra], capture_output=True,
                          text=True, cwd=cwd, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(cwd.iterdir())
    assert (results.read_bytes() if results.exists() else None) == before
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_gpu_runs_every_step_on_the_cpu_in_smoke_mode(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--no-compile"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 1
    row = rows[0]
    assert row["backbone"] == "test_efficientnet" and row["compile"] is False
    for key in ("bare_img_s", "loop_img_s", "loop_vs_bare", "evaluate_img_s", "explain_img_s", "first_epoch_s"):
        assert isinstance(row[key], float) and row[key] > 0, key
    assert not [k for k in row if k.endswith("_error")], row
    assert not list(tmp_path.iterdir())  # smoke mode writes no results
    results = BENCH.parent / "results" / "gpu.json"
    assert not results.exists() or "test_efficientnet" not in results.read_text()


def test_the_prepared_gpu_session_runs_on_the_cpu_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/gpu_session.py is what a session lent a GPU runs in its few minutes: every step of it
    (the benchmark, prepare, a run, a SIGKILLed run resumed, the weight comparison) runs here tiny."""
    script = BENCH.parent / "gpu_session.py"
    proc = subprocess.run([sys.executable, str(script), "run", "--smoke"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, check=False, env={**os.environ, "OUT": str(tmp_path / "out"),
                                                                      "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "session.json").read_text())
    assert record["bench_gpu_eager"]["exit"] == 0 and record["prepare"]["exit"] == 0 and "train_error" not in record
    assert record["train"]["epochs"] == 2 and record["train"]["test"]["balanced_accuracy"] is not None
    # on the CPU a killed-and-resumed run ends with exactly the weights of an uninterrupted one
    assert record["kill_resume"]["max_weight_difference"] == 0.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_gpu.log", "session.json", "train.log"]


def test_the_duplicates_benchmark_runs_every_method_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/bench_duplicates.py on a few synthetic images: planting, every method (the CNN with a
    tiny random model), the threshold choice; it writes no results."""
    rows = run_smoke("bench_duplicates.py", "duplicates.json", tmp_path)
    assert [r["method"].split()[0] for r in rows] == ["dermcam"] * 3 + ["pHash"] * 3 + ["test_efficientnet"]
    for row in rows:
        assert 0.0 <= row["min_recall"] <= 1.0 and row["images/s"] > 0 and row["worst_kind"], row


def test_the_serve_benchmark_runs_both_configurations_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/bench_serve.py with a tiny model, 2 clients x 3 requests: real servers start, answer without
    errors, form batches only when allowed to, and stop on Ctrl-C; it writes no results."""
    record = run_smoke("bench_serve.py", "serve.json", tmp_path)
    assert [r["config"] for r in record["rows"]] == ["batched", "unbatched"]
    for row in record["rows"]:
        assert row["errors"] == 0 and row["requests"] == 6 and row["exit_code"] == 130, row
        assert row["idle_p50_ms"] > 0 and row["load_img_s"] > 0, row
    assert record["rows"][1]["largest_batch"] == 1 and record["cpu_model"] and "load average" in record["uptime_before"]


def test_the_cross_validation_recipe_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/accuracy_cv_ham10000_lite.py on a tiny synthetic HAM10000 layout: prepare, a 2-fold
    cross-validation with metadata and colour constancy, the distilled student (reading metadata too) and
    every test row; it writes no results."""
    record = run_smoke("accuracy_cv_ham10000_lite.py", "accuracy_cv_ham10000_lite.json", tmp_path,
                       "--student-metadata", "age,sex,site")
    models = [row["model"] for row in record["rows"]]
    assert models == ["CV ensemble (2 folds)", "CV ensemble (2 folds) + TTA", "distilled student",
                      "fold 0 model alone", "fold 1 model alone"]
    for row in record["rows"]:
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["id"], row
    assert record["oof"]["images"] > 0 and record["options"]["metadata"] == "age,sex,site"
    assert record["config"]["student_metadata"] == "age,sex,site"
    assert set(record["minutes"]) >= {"prepare", "cross_validation", "distillation", "test_scoring", "training_total"}
    epochs = record["epoch_minutes"]  # every run's recorded epochs, read from the store
    assert len(epochs) == 3 and "student" in epochs and all(minutes >= 0 for minutes in epochs.values()), epochs
    assert "cpu_flags" in record["machine_at_start"]


def test_the_distillation_settings_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/distill_defaults.py on a tiny synthetic HAM10000 layout: a two-member teacher trained on
    the train split, one student per setting, every model scored on val with the paired difference to the
    first setting; run twice, the second reuses every run (the script checks); it writes no results."""
    record = run_smoke("distill_defaults.py", "distill_defaults.json", tmp_path)
    rows = record["rows"]
    assert [r["setting"] for r in rows] == ["teacher", "T=2 alpha=0.7", "T=2 alpha=0"]
    assert record["test_split_read"] is False and len(record["teacher"]["members"]) == 2
    assert [(r["temperature"], r["alpha"]) for r in rows[1:]] == [(2.0, 0.7), (2.0, 0.0)]
    assert len({rows[1]["run"], rows[2]["run"], *(m["run"] for m in record["teacher"]["members"])}) == 4
    for row in rows:
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["balanced_accuracy_ci"] is not None, row
    assert rows[1]["epochs"] == rows[2]["epochs"] == 1 and "d_balanced_accuracy" not in rows[1]
    assert rows[2]["d_balanced_accuracy"] == pytest.approx(rows[2]["balanced_accuracy"] - rows[1]["balanced_accuracy"],
                                                           abs=1e-6)
    assert record["images"] > 0 and record["options"]["epochs"] == 1
