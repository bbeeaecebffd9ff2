"""Shared fixtures. Every test runs with its own temporary DERMCAM_HOME: no test touches the real store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


_SESSION_THREADS: list[int] = []  # torch's own intra-op thread count, read before the first test runs


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Put torch's thread count back after every test. Commands run in this process (the CLI runner) set it
    (``--threads auto``: the cores minus the load average), and a different count changes float summation
    order: exact-resume tests that compare a run trained in one test (or fixture) with one resumed in
    another would then differ in the last bits for no fault of the code under test."""
    import torch

    if not _SESSION_THREADS:
        _SESSION_THREADS.append(torch.get_num_threads())
    yield
    if torch.get_num_threads() != _SESSION_THREADS[0]:
        torch.set_num_threads(_SESSION_THREADS[0])


@pytest.fixture(autouse=True)
def dermcam_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("dermcam-home")
    monkeypatch.setenv("DERMCAM_HOME", str(home))
    return home


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


SHARED_LITE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-lite"


@pytest.fixture
def ham10000_lite() -> Path:
    """The real reduced HAM10000 copy beside the checkout, or a clean skip when it is absent."""
    if not (SHARED_LITE / "HAM10000_metadata.csv").exists():
        pytest.skip("../shared/data/ham10000-lite is not present")
    return SHARED_LITE


@pytest.fixture(scope="session")
def prepared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one prepared synthetic data set ("synth"), built once per test session."""
    from dermcam.data.prepare import prepare
    from dermcam.data.synthetic import write_synthetic_ham10000

    base = tmp_path_factory.mktemp("prepared")
    src = write_synthetic_ham10000(base / "synth", n_lesions_per_class=12, images_per_lesion=(1, 2), seed=1)
    store = base / "store"
    prepare(src, name="synth", cache_size=(64, 48), root=store)
    return store


@pytest.fixture
def home(prepared_store: Path, dermcam_home: Path) -> Path:
    """This test's DERMCAM_HOME with the prepared synthetic set copied in."""
    shutil.copytree(prepared_store / "datasets", dermcam_home / "datasets")
    return dermcam_home


def run_json(runner, args: list[str]) -> object:
    """Invoke the CLI, require success, parse its JSON output."""
    from dermcam.cli import app

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def weights_of(run_dir: Path, epoch: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / f"epoch-{epoch:04d}.safetensors"))
