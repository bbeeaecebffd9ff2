"""Running dermcam through the CLI runner, and checking a refusal is one clear line (shared by the tests)."""

from __future__ import annotations

from dermcam.cli import app


def cli(runner, *args: object):
    """``dermcam ARGS`` in-process, wide enough that no message wraps."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def refused(result, code: int, *words: str) -> str:
    """The command failed with ``code`` and said why in one ``Error:`` line mentioning ``words``."""
    assert result.exit_code == int(code), result.output
    message = result.output.strip()
    assert message.startswith("Error:") and "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message
