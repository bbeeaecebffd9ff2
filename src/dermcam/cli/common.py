"""What every command shares: one-line errors with exit codes, JSON output, the console."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dermcam.errors import DermcamError, ExitCode

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turn library exceptions into ``Error: <one line>`` on stderr and the matching exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DermcamError as exc:
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout, nothing else mixed in."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_result(result: Any, json_output: bool, render: Callable[[Any], None]) -> None:
    """A library result's warnings on stderr, then ``result.to_dict()`` as JSON or ``render(result)``."""
    for warning in getattr(result, "warnings", []):
        err_console.print(f"[yellow]Warning:[/] {escape(warning)}")
    if json_output:
        print_json(result.to_dict())
    else:
        render(result)


JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")

NO_CALIBRATION_OPTION = typer.Option(False, "--no-calibration",
                                     help="Show the model's raw softmax probabilities and argmax decisions, "
                                          "ignoring the checkpoint's calibration and operating point.")
