"""The screenshots of docs/training.md, "Tracking runs in TensorBoard or MLflow": a dermcam comparison of two
tiny runs (two seeds, synthetic data, ``test_efficientnet``) tracked with ``--log tensorboard:DIR`` and
``--log mlflow:sqlite:///...``, then TensorBoard and the MLflow UI started on 127.0.0.1 and photographed in
headless Chromium through Playwright (the system's binary: apt-get install chromium).

Everything runs in a temporary folder (store, event files, MLflow database and artefacts); only the two
PNGs are written into the repository. Needs the dev extras (tensorboard, mlflow, playwright).

    python benchmarks/tracking_screenshot.py             # writes docs/img/tracking_tensorboard.png, tracking_mlflow.png
    python benchmarks/tracking_screenshot.py --epochs 3  # quicker
    python benchmarks/tracking_screenshot.py --work /tmp/w  # keep the runs there; a second call reuses them
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"
VIEW = {"width": 1400, "height": 900}
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, cwd: Path, timeout: float = 900.0) -> subprocess.Popen:
    """A server in its own session (killed with its workers), once ``url`` answers."""
    log = open(cwd / f"{Path(cmd[2]).name}.log", "wb")  # noqa: SIM115 - the server writes it until killed
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **QUIET})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd[:4])} exited; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{' '.join(cmd[:4])} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def train_runs(base: Path, epochs: int) -> tuple[Path, str]:
    """Two tracked runs of the synthetic set; returns the TensorBoard folder and the MLflow URI."""
    os.environ["DERMCAM_HOME"] = str(base / "store")
    os.environ.update(QUIET)
    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000
    from dermcam.progress import rich_progress
    from dermcam.train.trainer import train_configurations

    source = write_synthetic_ham10000(base / "synth", n_lesions_per_class=12, images_per_lesion=(1, 2), seed=1)
    prepare(source, name="synth", cache_size=(64, 48))
    board, uri = base / "board", f"sqlite:///{base / 'mlflow.db'}"
    options = {"dataset": "synth", "backbone": "test_efficientnet", "pretrained": "none", "image_size": 48,
               "batch_size": 16, "epochs": epochs, "patience": epochs, "lr": 1e-3, "device": "cpu",
               "log": [f"tensorboard:{board}", f"mlflow:{uri}"]}
    with rich_progress() as progress:
        train_configurations(options, grid={"seed": [1, 2]}, progress=progress)
    return board, uri


def screenshot(url: str, out: Path, wait_for: str, *, close: list[str] = (), settle_ms: int = 5000,
               first: str | None = None) -> None:
    """``url`` in headless Chromium once ``wait_for`` shows, after clicking away the panels ``close``
    names (Playwright selectors; one that is not there is skipped). ``first``: a page opened before it
    (a setting the UI keeps for the session)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEW)
        if first:
            page.goto(first, wait_until="load", timeout=300_000)
            page.wait_for_timeout(settle_ms)
        page.goto(url, wait_until="load", timeout=300_000)  # both UIs poll: the network is never idle
        page.wait_for_selector(wait_for, timeout=300_000)
        for selector in close:
            try:
                page.locator(selector).first.click(timeout=10_000)
            except Exception:  # noqa: BLE001 - a panel this version does not show
                pass
        page.wait_for_timeout(settle_ms)  # charts animate in
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, help="keep the store and trackers here (default: a temporary "
                                                   "folder); runs already there are photographed again")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dermcam-tracking-") as tmp:
        base = (args.work or Path(tmp)).resolve()
        base.mkdir(parents=True, exist_ok=True)
        os.chdir(base)  # MLflow's default artefact folder (./mlruns) lands here, not in the repository
        if (base / "mlflow.db").is_file():
            board, uri = base / "board", f"sqlite:///{base / 'mlflow.db'}"
        else:
            board, uri = train_runs(base, args.epochs)

        port = free_port()
        tensorboard = start([sys.executable, "-m", "tensorboard.main", "--logdir", str(board), "--host", "127.0.0.1",
                             "--port", str(port)], f"http://127.0.0.1:{port}/", base)
        try:
            screenshot(f"http://127.0.0.1:{port}/?tagFilter=balanced_accuracy%7Cmacro_f1%7Closs#timeseries",
                       args.out / "tracking_tensorboard.png", "text=val/balanced_accuracy",
                       close=["button:has-text('Settings')"])
        finally:
            stop(tensorboard)

        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=uri)
        experiment = mlflow.get_experiment_by_name("dermcam").experiment_id
        nested = [r for r in mlflow.search_runs([experiment]) if r.data.tags.get("mlflow.parentRunId")]
        best = max(nested, key=lambda r: r.data.metrics.get("test_balanced_accuracy", 0.0))
        port = free_port()
        ui = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1"], f"http://127.0.0.1:{port}/health", base)
        try:
            home = f"http://127.0.0.1:{port}/#/experiments/{experiment}"
            screenshot(f"{home}/runs/{best.info.run_id}", args.out / "tracking_mlflow.png",
                       "text=dermcam.best_checkpoint", close=["[aria-label='Close']"], settle_ms=10_000,
                       first=f"{home}/runs?workflowType=machine_learning")  # the UI's "Model training" view
        finally:
            stop(ui)


if __name__ == "__main__":
    main()
