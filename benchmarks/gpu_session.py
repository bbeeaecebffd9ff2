"""Issue 16's GPU checks in one prepared run, for a session that is lent a GPU machine for a few minutes.

Here, once per session (copies the real data and the one wheel the GPU image lacks into ``.gpu/``,
which .gitignore names)::

    python benchmarks/gpu_session.py stage

Then one device run (``carry: [".gpu"]``, timeout about 540 s; see docs/gpu.md)::

    python3 benchmarks/gpu_session.py run

which, writing everything worth keeping under ``$OUT`` (at most 8 files come back):

1. ``bench_gpu.py`` for convnext_tiny and efficientnet_b0, eager (``gpu_eager.json``, ``bench_gpu.log``);
2. prepares ham10000-lite and trains convnext_tiny on it (random weights: the GPU image has no offline
   ImageNet weights, and speed does not depend on them) for ``--epochs`` epochs, SIGKILLs a second,
   identical run after its first checkpoint, resumes it, and compares the two runs' final weights
   (``session.json``: training time, test metrics, the largest weight difference; ``train.log``);
3. ``bench_gpu.py --only-compile`` in the time left of ``--budget`` (``gpu_compiled.json``).

``run --smoke`` does all of it on the CPU with a tiny model, tiny images and the synthetic set, to check
this script without a GPU (tests/test_benchmarks.py runs it). Every step has its own time limit, and
a step that fails is recorded in ``session.json`` and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".gpu"
LITE = ROOT.parent / "shared" / "data" / "ham10000-lite"
# What the GPU image lacks (docs: /work/.library/device/KINDS.md lists what it has), for its Python 3.12.
WHEELS = ("platformdirs==4.3.6",)


def stage() -> None:
    """Copy ham10000-lite and the missing wheels into .gpu/ (which .gitignore names, so only ``carry``
    takes it to the device)."""
    STAGE.mkdir(exist_ok=True)
    if not (STAGE / "ham10000-lite").is_dir():
        shutil.copytree(LITE, STAGE / "ham10000-lite")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "any", "-d", str(STAGE / "whl"), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in STAGE.rglob("*") if p.is_file()) / 2**20
    print(f"staged {STAGE} ({size:.0f} MiB); device run: carry ['.gpu'], command "
          "'python3 benchmarks/gpu_session.py run', timeout_s 540")


def step(record: dict, name: str, argv: list[str], env: dict[str, str], log: Path, timeout: float) -> bool:
    """Run one step with its own time limit, its output appended to ``log``; its outcome in ``record``."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record[name] = {"exit": code, "seconds": round(time.perf_counter() - start, 1)}
    return code == 0


def run_json(argv: list[str], env: dict[str, str], timeout: float) -> object:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout)


def killed_and_resumed(cmd: list[str], env: dict[str, str], home: Path, timeout: float) -> dict:
    """Start ``cmd`` (a train command), SIGKILL it once its first checkpoint is written, resume it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    before = set((home / "runs").rglob("epoch-*.json")) if (home / "runs").exists() else set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (home / "runs").exists() and set((home / "runs").rglob("epoch-*.json")) - before:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_json([sys.executable, "-m", "dermcam", "train", "--resume", "--json"], env, timeout)
    return {"killed_mid_run": killed, "resumed": resumed}


def max_weight_difference(a: str, b: str, env: dict[str, str]) -> float:
    """The largest absolute difference between two checkpoints' weights (0.0: identical)."""
    code = ("import sys; from dermcam.store.references import resolve\n"
            "x, y = (resolve(r).load_weights() for r in sys.argv[1:])\n"
            "print(max(float((x[k].float() - y[k].float()).abs().max()) for k in x if x[k].numel()))")
    proc = subprocess.run([sys.executable, "-c", code, a, b], env=env, capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return float(proc.stdout.strip().splitlines()[-1])


def session(smoke: bool, epochs: int, budget: float) -> None:
    began = time.monotonic()
    out = Path(os.environ.get("OUT") or (ROOT / "gpu-session-out"))
    out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"dermcam-gpu-session-{os.getpid()}"
    env = {**os.environ, "DERMCAM_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), "/tmp/dermcam-site", os.environ.get("PYTHONPATH", "")])}
    wheels = sorted((STAGE / "whl").glob("*.whl"))
    if wheels and not smoke:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", "/tmp/dermcam-site", *map(str, wheels)], check=True)
    record: dict = {"smoke": smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    probe = ("import json, platform, torch, timm; print(json.dumps({'python': platform.python_version(), "
             "'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.version.cuda, "
             "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    record["machine"] = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                                                  text=True, check=True).stdout)
    bench_log, train_log = out / "bench_gpu.log", out / "train.log"

    # 1. the benchmark, eager (writes benchmarks/results/gpu.json, or with --smoke prints its rows)
    results = ROOT / "benchmarks" / "results" / "gpu.json"
    bench = ["--smoke"] if smoke else []
    step(record, "bench_gpu_eager", [sys.executable, "benchmarks/bench_gpu.py", *bench, "--no-compile"], env,
         bench_log, timeout=120 if smoke else 180)
    if results.is_file() and not smoke:
        shutil.copy(results, out / "gpu_eager.json")

    # 2. real data (or the synthetic set with --smoke), an uninterrupted run and a killed-and-resumed one
    if smoke:
        from_dir = ["data", "synthetic", str(home.parent / f"synthetic-{os.getpid()}"), "--lesions-per-class", "6"]
        step(record, "synthetic", [sys.executable, "-m", "dermcam", *from_dir], env, train_log, 120)
        source = str(home.parent / f"synthetic-{os.getpid()}")
        train = ["--backbone", "test_efficientnet", "--image-size", "64", "--batch-size", "16", "--device", "cpu"]
    else:
        source = str(STAGE / "ham10000-lite")
        train = ["--backbone", "convnext_tiny", "--image-size", "224", "--batch-size", "128", "--device", "cuda"]
    step(record, "prepare", [sys.executable, "-m", "dermcam", "prepare", source, "--name", "lite"], env, train_log,
         120 if smoke else 180)
    cmd = [sys.executable, "-m", "dermcam", "train", "--data", "lite", *train, "--pretrained", "none",
           "--epochs", str(epochs), "--patience", "99", "--json"]
    try:
        start = time.perf_counter()
        [plain] = run_json(cmd, env, timeout=600)
        record["train"] = {"wall_seconds": round(time.perf_counter() - start, 1), "run_id": plain["run_id"],
                           "training_seconds": plain["seconds"], "best": plain["best_checkpoint"],
                           "epochs": plain["epochs_done"],
                           "test": {k: (plain["test_metrics"] or {}).get(k) for k in
                                    ("balanced_accuracy", "macro_f1", "recall_mel", "auc_macro")},
                           "precision": plain["config"]["precision"], "batch_size": plain["config"]["batch_size"]}
        resumed = killed_and_resumed(cmd, env, home, timeout=600)
        [again] = resumed["resumed"]
        last = f"{epochs - 1}"
        record["kill_resume"] = {
            "killed_mid_run": resumed["killed_mid_run"], "run_id": again["run_id"],
            "max_weight_difference": max_weight_difference(f"{plain['run_id']}:{last}", f"{again['run_id']}:{last}",
                                                           env)}
    except Exception as exc:  # noqa: BLE001 - recorded; what ran before is still reported
        record["train_error"] = f"{type(exc).__name__}: {exc}"

    # 3. the benchmark with --compile, last: compiling takes minutes, and it gets what time is left
    left = budget - (time.monotonic() - began)
    if smoke:
        record["bench_gpu_compiled"] = "skipped with --smoke (it runs: 90 s on a cold compile cache)"
    elif left > 60:
        step(record, "bench_gpu_compiled", [sys.executable, "benchmarks/bench_gpu.py", "--only-compile"], env,
             bench_log, timeout=left - 20)
        if results.is_file() and record["bench_gpu_compiled"]["exit"] == 0:
            shutil.copy(results, out / "gpu_compiled.json")
    else:
        record["bench_gpu_compiled"] = f"skipped: {left:.0f} s of the budget left"
    (out / "session.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    print(json.dumps(record, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("stage", "run"))
    parser.add_argument("--smoke", action="store_true", help="run: on the CPU, tiny, synthetic data")
    parser.add_argument("--epochs", type=int, default=3, help="run: training epochs (default 3; 2 with --smoke)")
    parser.add_argument("--budget", type=float, default=510,
                        help="run: seconds for all of it (default 510, inside a 540 s device call)")
    args = parser.parse_args()
    if args.what == "stage":
        stage()
    else:
        session(args.smoke, 2 if args.smoke and args.epochs == 3 else args.epochs, args.budget)


if __name__ == "__main__":
    main()
