"""The CLI's start-up contract: help works, and it does not import the heavy ML stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dermcam import __version__
from dermcam.cli import app

HEAVY = ("torch", "timm", "torchvision")


@pytest.mark.parametrize("argv", [["--help"], ["prepare", "--help"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from dermcam.cli import app\n"
        "try:\n"
        f"    app({argv!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out or out.rstrip().endswith("HEAVY="), out


def test_version(runner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_python_dash_m_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "dermcam", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "dermcam" in proc.stdout
