"""Shared fixtures. Every test runs with its own temporary DERMCAM_HOME: no test touches the real store."""

from __future__ import annotations

from pathlib import Path

import pytest


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
